"""Review round 3 (issue 24): what an attacker found against the new defences.

* The row prefix (row_prefix.py) ran image layers on [rows, H, W] batches
  of grayscale images, which Keras reads as one image (RandomContrast then
  averaged over the examples), and a TextVectorization `standardize`
  callable on the whole micro-batch.
* The content digest read 1024 positions per row (the tail of a wide row
  unread) and was public: a generator could mix rows and seal them again.
* An adapted Normalization held as a class attribute was not reached.

Each test measures the escape (noiseless updates of neighbouring inputs,
against the replace-one bound 2 lr C / B) and has a power check.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from _helpers import flat

import tan_keras
from tan_keras.keras_dp import step_identity
from tan_keras.mechanism import content_digest, sampling

B, N, C, LR = 8, 32, 1.0, 1.0
BOUND = 2 * LR * C / B


def _noiseless(inp, out, **dp_kwargs):
    """A compiled private model at sigma 0."""
    model = tan_keras.make_private(
        keras.Model(inp, out),
        l2_norm_clip=C,
        noise_multiplier=0.0,
        expected_batch_size=B,
        dataset_size=N,
        clipping="vectorized",
        **dp_kwargs,
    )
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    return model


def _caller_update(build, x, y):
    """The noiseless update of one caller-drawn micro-batch (x, y), all rows real."""
    keras.utils.set_random_seed(0)
    model = _noiseless(*build(), sampling="caller_poisson")
    before = flat(model.get_weights())
    mask = np.ones(len(x), np.float32)
    model.fit(tf.data.Dataset.from_tensors((x, y, mask, True)), epochs=1, verbose=0)
    return flat(model.get_weights()) - before, model


def _grayscale_contrast():
    inp = keras.Input((8, 8))
    h = keras.layers.RandomContrast(0.5, value_range=(-1e6, 1e6), seed=3)(inp)
    out = keras.layers.Dense(1, kernel_initializer="zeros")(keras.layers.Flatten()(h))
    return inp, out


def test_image_layers_on_grayscale_batches_stay_per_example():
    x, y = np.zeros((B, 8, 8), np.float32), np.ones((B, 1), np.float32)
    first, model = _caller_update(_grayscale_contrast, x, y)
    assert model._row_prefix is None
    neighbour = x.copy()
    neighbour[0] = 100.0
    second, _ = _caller_update(_grayscale_contrast, neighbour, y)
    assert np.linalg.norm(first - second) <= BOUND * (1 + 1e-4)
    # Power check: run on the whole [rows, 8, 8] batch, the layer averages
    # over the examples: every row changes when one example does.
    layer = keras.layers.RandomContrast(0.5, value_range=(-1e6, 1e6), seed=3)
    alone = keras.layers.RandomContrast(0.5, value_range=(-1e6, 1e6), seed=3)
    together, changed = layer(x, training=True).numpy(), alone(neighbour, training=True).numpy()
    assert not np.allclose(together[1:], changed[1:])


def _first_text_appended(texts):
    first = tf.broadcast_to(texts[:1], tf.shape(texts))
    return tf.strings.lower(tf.strings.join([texts, first], separator=" "))


def _text_model(standardize):
    def build():
        inp = keras.Input((), dtype="string")
        vectorizer = keras.layers.TextVectorization(
            vocabulary=["a", "b", "c", "d"], output_sequence_length=6, standardize=standardize
        )
        h = keras.layers.Embedding(6, 3)(vectorizer(inp))
        return inp, keras.layers.Dense(1)(keras.layers.Flatten()(h))

    return build


def test_a_text_vectorization_callable_sees_one_text_at_a_time():
    texts = np.array(["a"] * B, object)
    y = np.ones((B, 1), np.float32)
    build = _text_model(_first_text_appended)
    first, model = _caller_update(build, texts, y)
    assert model._row_prefix is not None and model._row_prefix.one_row_at_a_time
    neighbour = texts.copy()
    neighbour[0] = "b c d b c d"
    second, _ = _caller_update(build, neighbour, y)
    assert np.linalg.norm(first - second) <= BOUND * (1 + 1e-4)
    # Power check: on the whole batch, the callable carries text 0 into every row.
    whole = _first_text_appended(tf.constant(neighbour)).numpy()
    assert all(b"b c d" in row for row in whole[1:])
    # keras.io's own custom_standardization (row-wise) still trains on the batch path.
    keras_io = _text_model(lambda t: tf.strings.regex_replace(tf.strings.lower(t), "<br />", " "))
    _caller_update(keras_io, texts, y)


WIDE = (12, 12, 8)  # 1152 values per row: more than the 1024 the digest read


def _poisson_update(x, y, between):
    """Noiseless update from one Poisson step fed through `between` (a generator)."""
    keras.utils.set_random_seed(0)
    inp = keras.Input(WIDE)
    model = _noiseless(
        inp, keras.layers.Dense(1, kernel_initializer="zeros")(keras.layers.Flatten()(inp))
    )
    sampler = tan_keras.PoissonSampler(N, B, physical_batch_size=N, seed=7)
    pipeline = tan_keras.make_poisson_dataset(x, y, sampler)
    any_rows = tf.nest.map_structure(
        lambda spec: tf.TensorSpec([None, *spec.shape[1:]], spec.dtype), pipeline.element_spec
    )
    data = tf.data.Dataset.from_generator(lambda: between(pipeline), output_signature=any_rows)
    before = flat(model.get_weights())
    model.fit(data, epochs=1, steps_per_epoch=1, verbose=0)
    return flat(model.get_weights()) - before


def _unchanged(pipeline):
    yield from pipeline


def _corner_mixed(pipeline):
    width = int(np.prod(WIDE))
    for x, y, mask, step_end, identity in pipeline:
        rows = tf.reshape(x, [x.shape[0], width])
        weights = tf.reshape(mask, [-1, 1])
        mean = tf.reduce_sum(rows * weights, 0, keepdims=True) / tf.reduce_sum(weights)
        tail = tf.concat([tf.zeros([1, width - 4]), tf.ones([1, 4])], 1)
        yield tf.reshape(rows + tail * mean * weights, x.shape), y, mask, step_end, identity


def test_a_change_in_the_last_values_of_a_wide_row_is_found():
    x, y = np.random.default_rng(0).normal(size=(N, *WIDE)).astype(np.float32), np.ones((N, 1))
    with pytest.raises(step_identity.SamplingIdentityError, match="content of micro-batch"):
        _poisson_update(x, y, _corner_mixed)
    # Power check: the same elements re-yielded unchanged train.
    assert np.any(_poisson_update(x, y, _unchanged) != 0)


def _mixed_and_sealed_again(secret):
    """A generator that mixes each micro-batch's rows and seals them under `secret`."""

    def between(pipeline):
        for x, y, mask, step_end, identity in pipeline:
            mixed = x + tf.reduce_mean(x, 0, keepdims=True)
            own, content_digest._SECRET = content_digest._SECRET, secret or content_digest._SECRET
            try:
                # With the pipeline's own nonce (review round 7: each pipeline seals with its own).
                identity = content_digest._seal(
                    (mixed, y, mask), identity, sampling.nonce_of(pipeline)
                )
            finally:
                content_digest._SECRET = own
            yield mixed, y, mask, step_end, identity

    return between


def test_a_seal_is_only_made_by_this_process_s_pipelines():
    x, y = np.random.default_rng(1).normal(size=(N, *WIDE)).astype(np.float32), np.ones((N, 1))
    # There is no public route to a seal any more.
    with pytest.raises(TypeError):
        sampling.identity_rows(0, 0, 1, N, B, 0, 4, content=None)
    # Sealed again with the module's code under another secret (another
    # process, a re-implementation of the public algorithm): refused.
    with pytest.raises(step_identity.SamplingIdentityError, match="content of micro-batch"):
        _poisson_update(x, y, _mixed_and_sealed_again((12345, 678)))
    # Power check: with this process's own secret (an internal function no
    # public API reaches) the same mix would pass: the secret is what holds.
    assert np.any(_poisson_update(x, y, _mixed_and_sealed_again(None)) != 0)


def test_the_digest_finds_a_change_of_one_value_anywhere():
    rng = np.random.default_rng(2)
    x = tf.constant(rng.normal(size=(3, 40, 40, 3)).astype(np.float32))  # 4800 values a row
    identity = sampling.identity_rows(3, 1, 2, N, B, 0, 3)
    before = content_digest._digest((x,), identity).numpy()
    for position in (0, 1023, 1024, 2047, 4799):
        changed = tf.reshape(x, [3, -1]).numpy()
        changed[1, position] = np.nextafter(changed[1, position], np.float32(np.inf))
        after = content_digest._digest((tf.reshape(changed, x.shape),), identity).numpy()
        assert after[1] != before[1] and after[0] == before[0] and after[2] == before[2]
    # Under XLA the digest is the same integer arithmetic.
    compiled = tf.function(content_digest._digest, jit_compile=True)
    np.testing.assert_array_equal(compiled((x,), identity).numpy(), before)


_TRAINING = np.random.default_rng(3).normal(3.0, 2.0, size=(64, 4)).astype(np.float32)


class _ClassAttributeNorm(keras.layers.Layer):
    def call(self, t):
        return self.norm(t)


class _InstanceNorm(keras.layers.Layer):
    def __init__(self, norm, **kwargs):
        super().__init__(**kwargs)
        self.held = norm

    def call(self, t):
        return self.held(t)


def _wrapped(layer):
    inp = keras.Input((4,))
    return tan_keras.make_private(
        keras.Model(inp, keras.layers.Dense(2)(layer(inp))),
        l2_norm_clip=1.0,
        noise_multiplier=1.0,
        expected_batch_size=16,
        dataset_size=64,
    )


def test_an_adapted_layer_held_as_a_class_attribute_is_refused(monkeypatch):
    adapted = keras.layers.Normalization()
    adapted.adapt(_TRAINING)
    monkeypatch.setattr(_ClassAttributeNorm, "norm", adapted, raising=False)
    with pytest.raises(ValueError, match="holds state computed from data"):
        _wrapped(_ClassAttributeNorm())
    with pytest.raises(ValueError, match="holds state computed from data"):
        _wrapped(_InstanceNorm(adapted))
    # Power check: statistics given to the constructor pass.
    given = keras.layers.Normalization(mean=0.0, variance=1.0)
    monkeypatch.setattr(_ClassAttributeNorm, "norm", given)
    _wrapped(_ClassAttributeNorm())


# Review round 4: the walk of what the model's code reaches.
_ADAPTED = keras.layers.Normalization()
_ADAPTED.adapt(_TRAINING)
_WORDS = [f"word{i}" for i in range(25000)]  # an ordinary large global (a vocabulary)
_NESTED = [{"i": [i]} for i in range(25000)]  # a large structure of containers


def _normalized_naming_words(t):
    if len(_WORDS) < 0:  # names the vocabulary; does nothing
        t = t * 0
    return _ADAPTED(t)


class _CallsGlobal:
    def __call__(self, t):
        return _ADAPTED(t)


class _Slotted:
    __slots__ = ("held",)

    def __init__(self, held):
        self.held = held

    def __call__(self, t):
        return self.held(t)


def _in_lambda(function):
    return keras.layers.Lambda(function, output_shape=(4,))


@pytest.mark.parametrize(
    "function",
    [_normalized_naming_words, _CallsGlobal(), _Slotted(_ADAPTED)],
    ids=["beside-a-large-list", "dunder-call", "slots"],
)
def test_an_adapted_layer_is_found_wherever_the_code_holds_it(function):
    with pytest.raises(ValueError, match="holds state computed from data"):
        _wrapped(_in_lambda(function))


def test_a_walk_too_large_to_finish_is_refused_not_cut_short():
    def naming_a_huge_structure(t):
        return t * (len(_NESTED) > 0)

    with pytest.raises(ValueError, match="cannot check"):
        _wrapped(_in_lambda(naming_a_huge_structure))

    # Power check: the same size in strings and numbers costs nothing.
    def naming_the_words(t):
        return t * (len(_WORDS) > 0)

    _wrapped(_in_lambda(naming_the_words))


@pytest.mark.parametrize("name", ["filter", "take_while"])
def test_a_predicate_over_micro_batches_is_refused_before_any_update(name):
    # A predicate sees the micro-batch's data: it could stop training (or
    # drop a step) when a given example is sampled, without noise.
    x, y = np.random.default_rng(4).normal(size=(N, 4)).astype(np.float32), np.ones((N, 1))
    inp = keras.Input((4,))
    model = _noiseless(inp, keras.layers.Dense(1)(inp))
    pipeline = tan_keras.make_poisson_dataset(x, y, tan_keras.PoissonSampler(N, B))
    selected = getattr(pipeline, name)(lambda x, *rest: tf.reduce_max(x) < 1e9)
    with pytest.raises(ValueError, match=f"transformed by {name.title().replace('_', '')}"):
        model.fit(selected, epochs=1, steps_per_epoch=1, verbose=0)
    # Power check: element selections that do not read the data still train.
    model.fit(pipeline.take(1).prefetch(1), epochs=1, steps_per_epoch=1, verbose=0)
    assert int(model.dp_steps.numpy()) == 1


def _copied_row(pipeline):
    """Row 0 (content and digest) copied over every other row."""
    for x, y, mask, step_end, identity in pipeline:
        rows = x.shape[0]
        yield (
            tf.repeat(x[:1], rows, 0),
            tf.repeat(y[:1], rows, 0),
            mask,
            step_end,
            # The digest column copied too; the row positions kept.
            tf.concat([identity[:, :8], tf.repeat(identity[:1, 8:], rows, 0)], 1),
        )


def _cut_short(pipeline):
    """The micro-batch cut after its first rows, its identity's row count rewritten."""
    for x, y, mask, step_end, identity in pipeline:
        keep = 3
        identity = tf.concat(
            [
                identity[:keep, :7],
                tf.fill([keep, 1], tf.constant(keep, tf.int64)),
                identity[:keep, 8:],
            ],
            1,
        )
        yield x[:keep], y[:keep], mask[:keep], step_end[:keep], identity


@pytest.mark.parametrize("between", [_copied_row, _cut_short], ids=["copied-row", "cut-short"])
def test_a_row_moved_or_a_micro_batch_cut_short_is_refused(between):
    x, y = np.random.default_rng(5).normal(size=(N, *WIDE)).astype(np.float32), np.ones((N, 1))
    # The row's identity is part of its digest: the copy does not match its
    # position, nor the cut rows their new count.
    with pytest.raises(step_identity.SamplingIdentityError, match="content of micro-batch"):
        _poisson_update(x, y, between)


def test_large_integer_ids_are_digested_exactly():
    ids = tf.constant([[2**30 + 1], [2**30 + 2]], tf.int64)  # equal as float32
    identity = sampling.identity_rows(0, 0, 1, N, B, 0, 2)
    sealed = content_digest._seal((ids,), identity)
    assert not content_digest.matches((tf.constant([[2**30 + 2], [2**30 + 1]], tf.int64),), sealed)
    assert content_digest.matches((tf.cast(ids, tf.int64),), sealed)
    # Power check: as float32 the two ids are one value.
    assert tf.cast(ids[0], tf.float32) == tf.cast(ids[1], tf.float32)


class _RunningMean:
    """An augmenter that subtracts a running mean of what it has seen."""

    def __init__(self):
        self.mean = tf.Variable(tf.zeros([4]))

    def __call__(self, copies):
        self.mean.assign(0.9 * self.mean + 0.1 * tf.reduce_mean(copies, 0))
        return copies - self.mean


def _flip_then_noise(copies, seed):
    return copies + tf.random.stateless_normal(tf.shape(copies), seed, stddev=0.1)


def test_an_augmenter_that_keeps_state_between_examples_is_refused():
    x, y = np.random.default_rng(6).normal(size=(N, 4)).astype(np.float32), np.ones((N, 1))
    sampler = tan_keras.PoissonSampler(N, B)
    with pytest.raises(ValueError, match="`augmenter`.*writes the variable"):
        tan_keras.make_poisson_dataset(x, y, sampler, augmult=2, augmenter=_RunningMean())
    # Power check: random state holds no data. Keras's random layers (their
    # seed generators advance), a tf.random.Generator and a seeded function pass.
    generator = tf.random.Generator.from_seed(1)
    noise = keras.layers.GaussianNoise(0.1, seed=3)
    for fine in (
        lambda copies: noise(copies, training=True),
        lambda copies: copies + generator.normal(tf.shape(copies)),
        _flip_then_noise,
    ):
        tan_keras.make_poisson_dataset(x, y, sampler, augmult=2, augmenter=fine)


class _LossWithMemory:
    """A loss that shifts its target by a running sum of the labels it has seen."""

    def __init__(self):
        self.seen = tf.Variable(0.0)

    def __call__(self, y_true, y_pred):
        self.seen.assign_add(tf.reduce_sum(tf.cast(y_true, tf.float32)))
        return tf.reduce_mean(tf.square(y_pred - self.seen), axis=-1)


def _two_steps_with_memory(first_label, monkeypatch=None):
    """The noiseless update of step 2 after step 1 held one example labelled `first_label`."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((4,))
    model = tan_keras.make_private(
        keras.Model(inp, keras.layers.Dense(1, kernel_initializer="zeros")(inp)),
        l2_norm_clip=C,
        noise_multiplier=0.0,
        expected_batch_size=B,
        dataset_size=N,
        clipping="vectorized",
        sampling="caller_poisson",
    )
    model.compile(optimizer=keras.optimizers.SGD(LR), loss=_LossWithMemory())
    x = 1 + 0.1 * np.random.default_rng(7).normal(size=(2, B, 4)).astype(np.float32)
    y = np.zeros((2, B, 1), np.float32)
    y[0, 0] = first_label
    steps = tf.data.Dataset.from_tensor_slices((x, y, np.ones((2, B), np.float32), [True, True]))
    model.fit(steps.take(1), epochs=1, verbose=0)
    before = flat(model.get_weights())
    model.fit(steps.skip(1), epochs=1, verbose=0)
    return flat(model.get_weights()) - before


def test_a_loss_that_keeps_state_between_examples_is_refused(monkeypatch):
    with pytest.raises(ValueError, match="`loss`.*writes the variable"):
        _two_steps_with_memory(0.0)
    # Power check: without the refusal, one example of step 1 moves the whole
    # of step 2's update, which it is not part of: every one of its B clipped
    # gradients, B times the replace-one bound.
    monkeypatch.setattr(tan_keras.DPKerasModel, "_refuse_loss_state", lambda *_: None)
    moved = np.linalg.norm(_two_steps_with_memory(0.0) - _two_steps_with_memory(100.0))
    assert moved > 3 * BOUND, moved
