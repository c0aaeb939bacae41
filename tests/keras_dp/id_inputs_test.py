"""Out-of-range ids into Embedding and lookup layers: dropped and counted, never printed.

Attack: an integer id outside an Embedding's table used to stop training at
the first step that sampled its example, with a CPU error that printed the
id (a private value); XLA silently clamped it. Now the example is dropped
from the step (the weights equal a run with it masked out) and counted in
`nonfinite_examples`, on every route, with and without XLA, whether the ids
are a model input, computed by earlier layers, or come from texts. Power
check: with the check turned off the same step fails with the id in its
message (or, under XLA, trains on the clamped id).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from _helpers import LOSS, flat, step_dataset

import tan_keras
from tan_keras.keras_dp import id_inputs
from tan_keras.keras_dp.dp_model import DPKerasModel

DP = dict(l2_norm_clip=0.1, noise_multiplier=0.0, expected_batch_size=8, dataset_size=100)
VOCAB = 10
# Ids no example may read: too large, too negative, a fraction (Keras would
# truncate it). -3 is valid: Keras reads it as row 7.
SECRET = 12345
BAD_ROWS = {2: SECRET, 4: -11, 6: 2.5}


def _ids(dtype=np.float32):
    rng = np.random.default_rng(0)
    x = rng.integers(0, VOCAB, (8, 3)).astype(dtype)
    x[0, 0] = -3
    return x


def _with_bad_ids(x):
    bad = x.copy()
    for row, value in BAD_ROWS.items():
        bad[row, 1] = value
    return bad


def _mask_without_bad_rows():
    mask = np.ones(8, np.float32)
    mask[list(BAD_ROWS)] = 0
    return mask


def _fit(model, x, y, mask=None, jit_compile=False, verbose=0):
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=LOSS, jit_compile=jit_compile)
    history = model.fit(step_dataset(model, x, y, mask), verbose=verbose)
    return flat(model.get_weights()), history.history


def _direct_model(clipping, seed=0, **kwargs):
    """float ids straight from the input (Embedding casts them)."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((3,))
    # Frozen for the layerwise route, which has no rule for a trained table.
    embedding = keras.layers.Embedding(VOCAB, 4, trainable=clipping != "layerwise")
    out = keras.layers.Dense(3)(keras.layers.Flatten()(embedding(inp)))
    return DPKerasModel(inp, out, clipping=clipping, **{**DP, **kwargs})


ROUTES = [
    ("vectorized", {}),
    ("ghost", {}),
    ("layerwise", {}),
    ("ghost", {"examples_per_chunk": 2}),
]
ROUTE_IDS = ["vectorized", "ghost", "layerwise", "chunked"]


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("clipping,options", ROUTES, ids=ROUTE_IDS)
def test_invalid_ids_of_an_input_are_dropped_and_counted(clipping, options, jit_compile, capfd):
    x, y = _ids(), np.arange(8, dtype=np.int32) % 3
    model = _direct_model(clipping, **options)
    got, history = _fit(model, _with_bad_ids(x), y, jit_compile=jit_compile, verbose=2)
    assert model.clipping == clipping
    assert history["nonfinite_examples"] == [3.0]
    want, _ = _fit(_direct_model(clipping, **options), x, y, _mask_without_bad_rows(), jit_compile)
    np.testing.assert_allclose(got, want, atol=1e-6)
    if clipping == "vectorized" and not jit_compile:
        # Power check of the comparison: which examples are kept matters.
        other, _ = _fit(_direct_model(clipping, **options), x, y, None, jit_compile)
        assert not np.allclose(got, other, atol=1e-4)
    printed = "".join(capfd.readouterr())
    assert str(SECRET) not in printed and "12345" not in printed


@pytest.mark.parametrize("jit_compile", [False, True])
def test_power_check_without_the_check_the_step_fails(jit_compile, monkeypatch):
    monkeypatch.setattr(id_inputs.IdCheck, "of", classmethod(lambda cls, model: None))
    x, y = _ids(), np.arange(8, dtype=np.int32) % 3
    model = _direct_model("ghost")
    if not jit_compile:
        # The step fails (its message withholds the id: test below).
        with pytest.raises(tf.errors.InvalidArgumentError, match="withheld"):
            _fit(model, _with_bad_ids(x), y)
        return
    # XLA clamps the id: the example trains, uncounted.
    got, history = _fit(model, _with_bad_ids(x), y, jit_compile=True)
    assert history["nonfinite_examples"] == [0.0]
    want, _ = _fit(_direct_model("ghost"), x, y, _mask_without_bad_rows(), True)
    assert not np.allclose(got, want, atol=1e-6)


def _computed_model(kind, clipping):
    """Ids computed from the input by a keras.ops call, a Lambda or an IntegerLookup."""
    keras.utils.set_random_seed(1)
    inp = keras.Input((3,), dtype="int32")
    if kind == "lambda":
        ids = keras.layers.Lambda(lambda t: t * 2, output_shape=(3,))(inp)
        vocab = 2 * VOCAB
    elif kind == "ops":
        ids = keras.ops.cast(inp, "float32") + 1.0
        vocab = VOCAB + 1
    else:
        # 0 is the OOV index, 1..10 the values 0..9, a table of 8 rows: the
        # values 7, 8, 9 (indices 8, 9, 10) are out of its range.
        ids = keras.layers.IntegerLookup(vocabulary=np.arange(VOCAB))(inp)
        vocab = 8
    h = keras.layers.Flatten()(keras.layers.Embedding(vocab, 4)(ids))
    return DPKerasModel(inp, keras.layers.Dense(3)(h), clipping=clipping, **DP)


@pytest.mark.parametrize(
    "kind,clipping,jit_compile",
    [
        ("lambda", "vectorized", False),
        ("lambda", "ghost", True),
        ("ops", "ghost", False),
        ("ops", "vectorized", True),
        # Keras runs a model with a lookup table without XLA.
        ("lookup", "ghost", False),
        ("lookup", "vectorized", False),
    ],
)
def test_invalid_ids_computed_by_earlier_layers_are_dropped(kind, clipping, jit_compile):
    rng = np.random.default_rng(2)
    y = np.arange(8, dtype=np.int32) % 3
    if kind == "lookup":
        x = rng.integers(0, 7, (8, 3)).astype(np.int32)
        bad, rows = x.copy(), [1, 5]
        bad[1, 0], bad[5, 2] = 8, 9
    else:
        x = rng.integers(0, VOCAB, (8, 3)).astype(np.int32)
        bad, rows = x.copy(), [3, 6]
        bad[3, 1], bad[6, 2] = SECRET, -VOCAB - 5
    got, history = _fit(_computed_model(kind, clipping), bad, y, jit_compile=jit_compile)
    assert history["nonfinite_examples"] == [2.0]
    mask = np.ones(8, np.float32)
    mask[rows] = 0
    want, _ = _fit(_computed_model(kind, clipping), x, y, mask, jit_compile)
    np.testing.assert_allclose(got, want, atol=1e-6)


TEXTS = np.array(
    [["w1 w2"], ["w9 w1"], ["w3 w3 w4"], ["w2 w12"], ["w5"], ["w1 w6 w7"], ["w15"], ["w2 w3"]]
)


def _text_model(clipping, vocab_size=8):
    # TextVectorization maps w_k to k + 1 (0 pads, 1 is OOV): the table of
    # 8 rows has no row for w7 and above.
    keras.utils.set_random_seed(3)
    words = [f"w{k}" for k in range(1, 18)]
    text = keras.Input((1,), dtype="string")
    vectorizer = keras.layers.TextVectorization(
        max_tokens=20, vocabulary=words, output_sequence_length=4
    )
    h = keras.layers.Embedding(vocab_size, 4)(vectorizer(text))
    out = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling1D()(h))
    return DPKerasModel(text, out, clipping=clipping, **DP)


@pytest.mark.parametrize("clipping", ["vectorized", "ghost"])
def test_texts_whose_tokens_exceed_the_table_are_dropped(clipping):
    y = np.arange(8, dtype=np.int32) % 3
    got, history = _fit(_text_model(clipping), TEXTS, y)
    bad = [1, 3, 5, 6]  # w9, w12, w7 (index 8), w15
    assert history["nonfinite_examples"] == [float(len(bad))]
    mask = np.ones(8, np.float32)
    mask[bad] = 0
    texts = TEXTS.copy()
    texts[bad] = "w1"
    want, _ = _fit(_text_model(clipping), texts, y, mask)
    np.testing.assert_allclose(got, want, atol=1e-6)


class _Embedder(keras.layers.Layer):
    """A custom layer that calls its Embedding itself: no graph shows its ids."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.table = keras.layers.Embedding(VOCAB, 4)

    def call(self, ids):
        return self.table(ids + 1)


class SubclassedTagger(keras.Model):
    """A subclassed model (make_private(model, input_shape=...)) with a Dropout."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.table = keras.layers.Embedding(VOCAB, 4)
        self.drop = keras.layers.Dropout(0.0)
        self.head = keras.layers.Dense(3)

    def call(self, ids, training=False):
        h = self.drop(self.table(ids), training=training)
        return self.head(keras.ops.reshape(h, (-1, 12)))


def _nested_model(kind):
    keras.utils.set_random_seed(4)
    if kind == "subclassed":
        model = SubclassedTagger()
        return tan_keras.make_private(model, input_shape=(3,), clipping="vectorized", **DP)
    inp = keras.Input((3,), dtype="int32")
    if kind == "sequential":
        block = keras.Sequential(
            [keras.Input((3,), dtype="int32"), keras.layers.Embedding(VOCAB, 4)]
        )
    else:
        block = _Embedder()
    h = keras.layers.Flatten()(block(inp))
    return DPKerasModel(inp, keras.layers.Dense(3)(h), clipping="vectorized", **DP)


@pytest.mark.parametrize("kind", ["sequential", "custom_layer", "subclassed"])
def test_ids_read_inside_a_nested_model_or_a_custom_layer_are_checked(kind):
    x = np.random.default_rng(5).integers(0, VOCAB - 1, (8, 3)).astype(np.int32)
    y = np.arange(8, dtype=np.int32) % 3
    bad = x.copy()
    bad[2, 2] = SECRET
    got, history = _fit(_nested_model(kind), bad, y)
    assert history["nonfinite_examples"] == [1.0]
    mask = np.ones(8, np.float32)
    mask[2] = 0
    want, _ = _fit(_nested_model(kind), x, y, mask)
    np.testing.assert_allclose(got, want, atol=1e-6)


def _category_model():
    keras.utils.set_random_seed(6)
    inp = keras.Input((3,), dtype="int32")
    h = keras.layers.CategoryEncoding(num_tokens=5, output_mode="multi_hot")(inp)
    return DPKerasModel(inp, keras.layers.Dense(3)(h), clipping="vectorized", **DP)


def test_category_encoding_ids_are_checked_without_negative_wrap():
    x = np.random.default_rng(7).integers(0, 5, (8, 3)).astype(np.int32)
    y = np.arange(8, dtype=np.int32) % 3
    bad = x.copy()
    bad[0, 0], bad[7, 1] = -1, 5  # -1 fails bincount; 5 would be ignored silently
    got, history = _fit(_category_model(), bad, y)
    assert history["nonfinite_examples"] == [2.0]
    mask = np.ones(8, np.float32)
    mask[[0, 7]] = 0
    want, _ = _fit(_category_model(), x, y, mask)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_valid_ids_matches_what_keras_reads():
    ids = tf.constant([[0.0, 9.0], [-10.0, 3.0], [10.0, 1.0], [-11.0, 0.0], [2.5, 1.0]])
    assert id_inputs.valid_ids(ids, -10, 10).numpy().tolist() == [True, True, False, False, False]
    nan = tf.constant([[np.nan], [np.inf], [1.0]])
    assert id_inputs.valid_ids(nan, 0, 5).numpy().tolist() == [False, False, True]
    wide = tf.constant([[2**40], [4]], tf.int64)
    assert id_inputs.valid_ids(wide, 0, 5).numpy().tolist() == [False, True]
    # Keras itself: -10 reads row 0, 9 row 9 (the bounds are Keras's).
    layer = keras.layers.Embedding(10, 2)
    rows = layer(tf.constant([-10, 9, 0])).numpy()
    np.testing.assert_array_equal(rows[0], rows[2])


@pytest.mark.parametrize("lookup", [keras.layers.IntegerLookup, keras.layers.StringLookup])
def test_a_lookup_that_fails_on_unknown_values_is_refused(lookup):
    dtype = "int64" if lookup is keras.layers.IntegerLookup else "string"
    vocabulary = [1, 2, 3] if dtype == "int64" else ["a", "b", "c"]
    inp = keras.Input((2,), dtype=dtype)

    def build(oov):
        ids = lookup(vocabulary=vocabulary, num_oov_indices=oov, name="lookup")(inp)
        h = keras.layers.Flatten()(keras.layers.Embedding(4, 2)(ids))
        return DPKerasModel(inp, keras.layers.Dense(2)(h), **DP)

    with pytest.raises(ValueError, match="`num_oov_indices` of layer `lookup`.*>= 1"):
        build(0)
    build(1)  # power check: the default is accepted


def test_ids_computed_through_a_random_layer_are_refused():
    inp = keras.Input((3,))
    noisy = keras.layers.GaussianNoise(0.5, name="noise")(inp)
    out = keras.layers.Dense(2)(keras.layers.Flatten()(keras.layers.Embedding(VOCAB, 2)(noisy)))
    with pytest.raises(ValueError, match="random layer `noise`"):
        DPKerasModel(inp, out, **DP)


def test_a_model_whose_zero_input_reads_invalid_ids_is_refused():
    inp = keras.Input((3,), dtype="int32")
    ids = keras.layers.Lambda(lambda t: t + VOCAB, output_shape=(3,))(inp)
    out = keras.layers.Dense(2)(keras.layers.Flatten()(keras.layers.Embedding(VOCAB, 2)(ids)))
    with pytest.raises(ValueError, match="all zeros reads ids out of range"):
        DPKerasModel(inp, out, **DP)
