"""Attacks on the per-example guarantee through the model itself, and their refusal.

Each test builds the smallest model that breaks a route and the example that
shows it: cross-example ops under the batched layerwise pass, layers writing
variables from data, and tied weights under ghost/layerwise clipping.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from _helpers import LOSS, flat, one_step

from tan_keras import _keras_internals
from tan_keras.keras_dp.dp_model import DPKerasModel
from tan_keras.mechanism import clipping, ghost, layerwise, model_analysis, per_example
from tan_keras.models import build_model

layers = keras.layers
LOSS_FN = per_example.unreduced_loss_fn(LOSS)
LR, CLIP, BATCH = 0.5, 0.1, 4
DP = dict(l2_norm_clip=CLIP, noise_multiplier=0.0, expected_batch_size=BATCH, dataset_size=40)


def _dp(build, clipping_mode="auto", jit_compile=False, **dp):
    """A compiled DPKerasModel on a fresh `build()` (deterministic weights)."""
    base = build()
    model = DPKerasModel(base.inputs, base.outputs, clipping=clipping_mode, **{**DP, **dp})
    model.compile(optimizer=keras.optimizers.SGD(LR), loss=LOSS, jit_compile=jit_compile)
    return model


# --------------------------------------------------- 2. cross-example computation
class BatchCentering(layers.Layer):
    """Subtracts the batch mean: each row's output depends on every row."""

    def call(self, x):
        return x - tf.reduce_mean(x, axis=0, keepdims=True)


class StopGradientCentering(layers.Layer):
    """The same mixing, invisible to gradients."""

    def call(self, x):
        return x - tf.stop_gradient(tf.reduce_mean(x, axis=0, keepdims=True))


def _centering_model(kind):
    keras.utils.set_random_seed(1)
    inp = keras.Input((4,))
    h = layers.Dense(8, activation="tanh", name="hidden")(inp)
    if kind == "lambda":
        h = layers.Lambda(
            lambda t: t - tf.reduce_mean(t, axis=0, keepdims=True), name="batch_centering"
        )(h)
    elif kind == "ops":  # keras.ops calls in the functional graph: no layer at all
        h = h - keras.ops.mean(h, axis=0, keepdims=True)
    elif kind == "ops_stop_gradient":
        h = h - keras.ops.stop_gradient(keras.ops.mean(h, axis=0, keepdims=True))
    elif kind == "custom":
        h = BatchCentering(name="batch_centering")(h)
    elif kind == "stop_gradient":
        h = StopGradientCentering(name="batch_centering")(h)
    elif kind == "softmax_over_batch":  # allow-listed type, mixing configuration
        h = layers.Softmax(axis=0, name="batch_softmax")(h)
    return keras.Model(inp, layers.Dense(3, name="logits")(h))


def _neighbouring_batches(copies=8):
    """A batch D and D plus one far-away example z (rows of D first).

    D repeats one example: centered by the batch mean, its copies have zero
    hidden features and only bias gradients; z moves the mean, so every copy
    gets kernel gradients in a new direction, and their changes add up.
    """
    x = np.tile(np.random.default_rng(0).normal(size=(1, 4)).astype(np.float32), (copies, 1))
    y = np.zeros(copies, np.int32)
    z = np.full((1, 4), 6.0, np.float32)
    return (x, y), (np.concatenate([x, z]), np.concatenate([y, [1]]).astype(np.int32))


def _clipped_sum(model, per_example_gradients, x, y):
    views = tf.constant(x[:, None])
    grads = per_example_gradients(model, LOSS_FN, views, tf.constant(y))[0]
    return flat(clipping.clip_and_sum(grads, CLIP, tf.ones([len(x)])).grad_sum)


@pytest.mark.parametrize("kind", ["lambda", "ops", "custom"])
def test_batched_pass_mixing_examples_breaks_sensitivity_and_is_refused(kind):
    (x, y), (xz, yz) = _neighbouring_batches()
    # The attack, on the route that used to accept this model: adding z moves
    # the clipped sum by far more than C (the other examples' gradients
    # carry z's data through the batch mean).
    model = _centering_model(kind)
    moved = _clipped_sum(model, layerwise.per_example_gradients, xz, yz) - _clipped_sum(
        model, layerwise.per_example_gradients, x, y
    )
    assert np.linalg.norm(moved) > 3 * CLIP
    # ... while the vectorized pass keeps each example alone.
    moved = _clipped_sum(model, per_example.per_example_gradients, xz, yz) - _clipped_sum(
        model, per_example.per_example_gradients, x, y
    )
    assert np.linalg.norm(moved) <= CLIP * (1 + 1e-5)

    assert not layerwise.supports(_centering_model(kind))
    name = "\\(Mean\\)" if kind == "ops" else "batch_centering"
    with pytest.raises(ValueError, match=f"`clipping`.*{name}.*clipping='vectorized'"):
        _dp(lambda: _centering_model(kind), "layerwise")

    # "auto" under XLA no longer picks layerwise; its update respects lr * C / B.
    # The choice follows `layerwise.supports` (checked above for every kind),
    # so the two compiled steps run for one kind only.
    if kind != "custom":
        return
    weights = []
    for xs, ys in ((x, y), (xz, yz)):
        model = _dp(lambda: _centering_model(kind), jit_compile=True)
        assert model.clipping != "layerwise"
        weights.append(flat(one_step(model, xs, ys)))
    assert np.linalg.norm(weights[1] - weights[0]) <= LR * CLIP / BATCH * (1 + 1e-4)


def test_the_gradient_probe_catches_allowed_layers_that_reduce_over_the_batch():
    model = _centering_model("softmax_over_batch")
    # The probe (second line) sees it on its own ...
    assert "depend on the inputs of other examples" in model_analysis._probe(model, 1)
    # ... the static check of axis arguments (first line) reports it first
    # (tests/mechanism/batch_axis_config_test.py: behind a gate, only it does).
    reason = layerwise.unsupported_reason(model)
    assert "`batch_softmax` (Softmax) has axis=0" in reason
    with pytest.raises(ValueError, match="batch_softmax.*axis=0.*clipping='vectorized'"):
        _dp(lambda: _centering_model("softmax_over_batch"), "layerwise")


def test_probe_and_allow_list_are_both_needed(monkeypatch):
    allowed = model_analysis.per_example_layer_types()
    extended = allowed + (BatchCentering, StopGradientCentering)
    monkeypatch.setattr(model_analysis, "per_example_layer_types", lambda: extended)
    # A custom layer let through the allow-list is caught by the probe...
    assert "other examples" in model_analysis.cross_example_reason(_centering_model("custom"))
    # ... but a mixing behind tf.stop_gradient is invisible to gradients: only
    # the allow-list (which has no custom layers) refuses it.
    assert model_analysis.cross_example_reason(_centering_model("stop_gradient")) is None
    monkeypatch.setattr(model_analysis, "per_example_layer_types", lambda: allowed)
    reason = model_analysis.cross_example_reason(_centering_model("stop_gradient"))
    assert "`batch_centering` (StopGradientCentering)" in reason
    # The same hidden mixing written with keras.ops between layers: no layer
    # to check, the graph's operations are.
    reason = model_analysis.cross_example_reason(_centering_model("ops_stop_gradient"))
    assert "of the functional graph is not a layer" in reason


def test_per_example_models_keep_layerwise():
    def noisy():
        keras.utils.set_random_seed(2)
        inp = keras.Input((6, 6, 2))
        h = layers.Conv2D(4, 3, padding="same")(inp)
        h = layers.Dropout(0.5)(layers.GaussianNoise(0.3)(layers.ReLU()(h)))
        h = layers.GroupNormalization(groups=2)(h)
        return keras.Model(inp, layers.Dense(3)(layers.Flatten()(h)))

    assert layerwise.supports(noisy(), augmult=3)
    assert layerwise.supports(build_model("small_cnn", (8, 8, 1), 10), augmult=2)
    model = _dp(noisy, jit_compile=True, augmult=2)
    assert model.clipping == "layerwise"


# ----------------------------------------------------------- 3. state updates
class RunningMean(layers.Layer):
    """Stores the batch mean in a non-trainable weight in training mode."""

    def build(self, shape):
        self.running = self.add_weight(
            name="running", shape=(), initializer="zeros", trainable=False
        )

    def call(self, x, training=None):
        if training:
            self.running.assign(tf.reduce_mean(x))
        return x


class CondRunningMean(RunningMean):
    """The same write, inside a tf.cond branch."""

    def call(self, x, training=None):
        def update():
            self.running.assign_add(tf.reduce_mean(x))
            return tf.constant(1)

        tf.cond(tf.reduce_sum(x) > -1e9, update, lambda: tf.constant(0))
        return x


class ScatterMemory(RunningMean):
    """Writes one input value into a slot of a buffer."""

    def build(self, shape):
        self.memory = self.add_weight(
            name="memory", shape=(4,), initializer="zeros", trainable=False
        )

    def call(self, x, training=None):
        self.memory.value.scatter_nd_update([[0]], x[0, :1])
        return x


class ReadsFixedOffset(RunningMean):
    """Only reads its non-trainable weight: accepted."""

    def call(self, x, training=None):
        return x - self.running


def _stateful_model(kind):
    inp = keras.Input((4,))
    h = layers.Dense(4, name="hidden")(inp)
    if kind == "assign":
        h = RunningMean(name="leaky_stats")(h)
    elif kind == "assign_in_cond":
        h = CondRunningMean(name="leaky_stats")(h)
    elif kind == "scatter":
        h = ScatterMemory(name="leaky_stats")(h)
    elif kind == "closure":
        counter = tf.Variable(0.0, trainable=False, name="closure_counter")
        h = layers.Lambda(
            lambda t: t + 0.0 * counter.assign_add(tf.reduce_sum(t)), name="leaky_stats"
        )(h)
    elif kind == "nested":
        inner = keras.Sequential([keras.Input((4,)), RunningMean(name="leaky_stats")])
        h = inner(h)
    elif kind == "reads_only":
        h = ReadsFixedOffset(name="fixed_offset")(h)
    elif kind == "noise":
        h = layers.GaussianDropout(0.1)(layers.GaussianNoise(0.1)(layers.Dropout(0.2)(h)))
    return keras.Model(inp, layers.Dense(3)(h))


@pytest.mark.parametrize(
    "kind,match",
    [
        ("assign", "`leaky_stats`.*`leaky_stats/running`.*unclipped.*Keep such state fixed"),
        ("assign_in_cond", "`leaky_stats`.*`leaky_stats/running`.*Assign(Add)?VariableOp"),
        ("scatter", "`leaky_stats`.*`leaky_stats/memory`.*ResourceScatterNdUpdate"),
        ("closure", "`leaky_stats` \\(Lambda\\).*closure_counter"),
        ("nested", "`leaky_stats` \\(RunningMean\\).*running"),
    ],
)
def test_layers_writing_variables_from_data_are_refused_at_construction(kind, match):
    model = _stateful_model(kind)
    # Not caught by the old class check: none is a (v2) BatchNormalization.
    assert not any(
        isinstance(layer, keras.layers.BatchNormalization)
        for layer in _keras_internals.all_layers(model)
    )
    with pytest.raises(ValueError, match=match):
        DPKerasModel(model.inputs, model.outputs, **DP)


def test_the_refused_write_really_stores_one_example():
    model = _stateful_model("assign")
    example = np.arange(4, dtype=np.float32)[None]
    model(example, training=True)
    hidden = model.get_layer("hidden")(example)
    assert float(model.get_layer("leaky_stats").running) == pytest.approx(
        float(tf.reduce_mean(hidden))
    )


@pytest.mark.parametrize("kind", ["reads_only", "noise"])
def test_reading_state_and_random_layers_are_accepted(kind):
    model = _stateful_model(kind)
    assert model_analysis.state_updates(model) == ()
    DPKerasModel(model.inputs, model.outputs, **DP)


def test_random_augmentation_layers_write_only_rng_state():
    inp = keras.Input((8, 8, 3))
    h = layers.RandomFlip()(layers.RandomTranslation(0.1, 0.1)(inp))
    out = layers.Dense(2)(layers.Flatten()(h))
    DPKerasModel(inp, out, **DP)


class SeedSmuggler(layers.Layer):
    """Writes data into the state of its own SeedGenerator (saved with the model)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seed_generator = keras.random.SeedGenerator(0)

    def call(self, x):
        state = self.seed_generator.state
        state.assign(tf.cast(x[:2, 0] * 1e6, state.dtype))
        return x


class DropoutSmuggler(layers.Dropout):
    """A Dropout subclass whose call writes data into the seed state."""

    def call(self, x, training=None):
        state = self.seed_generator.state
        state.assign(tf.cast(x[:2, 0] * 1e6, state.dtype))
        return super().call(x, training=training)


@pytest.mark.parametrize(
    "smuggler",
    [lambda: SeedSmuggler(name="smuggler"), lambda: DropoutSmuggler(0.5, name="smuggler")],
)
def test_data_written_into_a_seed_state_is_refused(smuggler):
    # Only Keras's own random layers may advance a seed state; the same
    # assignment from a custom layer (or a subclass) is a data write.
    inp = keras.Input((4,))
    out = layers.Dense(2)(smuggler()(inp))
    with pytest.raises(ValueError, match="`smuggler`.*seed_generator_state"):
        DPKerasModel(inp, out, **DP)


# ------------------------------------------------------------- 8. tied weights
class TiedDecoder(layers.Layer):
    """Decodes with the transposed kernel of another layer."""

    def __init__(self, encoder, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder

    def call(self, h):
        return tf.matmul(h, self.encoder.kernel, transpose_b=True)


class HeldKernel(layers.Layer):
    """Holds another layer's kernel as its own weight."""

    def __init__(self, kernel, **kwargs):
        super().__init__(**kwargs)
        self.tied_kernel = kernel

    def call(self, h):
        return tf.matmul(h, self.tied_kernel, transpose_b=True)


def _tied_model(kind="decoder_layer"):
    keras.utils.set_random_seed(3)
    inp = keras.Input((6,))
    encoder = layers.Dense(4, activation="tanh", name="encoder")
    h = encoder(inp)
    if kind == "decoder_layer":
        r = TiedDecoder(encoder, name="decoder")(h)
    elif kind == "held_kernel":
        r = HeldKernel(encoder.kernel, name="decoder")(h)
    else:
        # (keras.ops applied to encoder.kernel between layers would run once,
        # eagerly, and freeze a copy of it: no tie.)
        r = layers.Lambda(lambda t: tf.matmul(t, encoder.kernel, transpose_b=True))(h)
    return keras.Model(inp, layers.Dense(3, name="logits")(layers.Add()([inp, r])))


def _tied_data():
    rng = np.random.default_rng(1)
    return rng.normal(size=(BATCH, 6)).astype(np.float32), rng.integers(0, 3, BATCH)


def _step(clipping_mode, jit_compile=False):
    return flat(one_step(_dp(_tied_model, clipping_mode, jit_compile), *_tied_data()))


@pytest.mark.parametrize("kind", ["decoder_layer", "held_kernel", "lambda"])
def test_tied_kernels_are_found_and_never_ghosted(kind, monkeypatch):
    model = _tied_model(kind)
    encoder = model.get_layer("encoder")
    tied = model_analysis.tied_variables(model)
    assert set(tied) == {id(encoder.kernel)}
    assert "tied weights" in tied[id(encoder.kernel)].describe()
    assert [layer.name for layer in ghost.select_layers(model, 1)] == ["logits"]
    # Without the exclusion the encoder would be ghosted (its ghost norm is cheaper).
    monkeypatch.setattr(model_analysis, "tied_variables", lambda _: {})
    assert encoder in ghost.select_layers(model, 1)


def test_tied_weights_ghost_and_auto_equal_vectorized_and_layerwise_is_refused(monkeypatch):
    want = _step("vectorized")
    assert not np.allclose(want, flat(_tied_model().get_weights()))
    np.testing.assert_allclose(_step("ghost"), want, atol=1e-6)
    np.testing.assert_allclose(_step("auto", jit_compile=True), want, atol=1e-5)
    with pytest.raises(ValueError, match="`clipping`.*encoder/kernel.*tied.*clipping='vectorized'"):
        _dp(_tied_model, "layerwise")
    # Even with the decoder allowed, the tie alone rules layerwise out.
    extended = model_analysis.per_example_layer_types() + (TiedDecoder,)
    monkeypatch.setattr(model_analysis, "per_example_layer_types", lambda: extended)
    assert "tied" in layerwise.unsupported_reason(_tied_model())
    # Power: the old routes, which only count the encoder's own call, differ.
    x, y = _tied_data()
    model = _tied_model()
    fast = layerwise.per_example_gradients(model, LOSS_FN, tf.constant(x[:, None]), y)[0]
    slow = per_example.per_example_gradients(model, LOSS_FN, tf.constant(x[:, None]), y)[0]
    index = [v.path for v in model.trainable_variables].index("encoder/kernel")
    assert not np.allclose(fast[index].numpy(), slow[index].numpy(), atol=1e-3)
    monkeypatch.setattr(model_analysis, "tied_variables", lambda _: {})
    assert not np.allclose(_step("ghost"), want, atol=1e-4)


def test_shared_layers_are_not_ties():
    inp = keras.Input((4,))
    shared = layers.Dense(4, activation="tanh", name="shared")
    model = keras.Model(inp, layers.Dense(3)(shared(shared(inp))))
    assert model_analysis.tied_variables(model) == {}
    assert shared in ghost.select_layers(model, 1)
    assert layerwise.supports(model)
