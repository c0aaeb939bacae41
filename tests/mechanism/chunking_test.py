"""Memory-bounded clipping: chunked results equal the whole micro-batch's."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from _helpers import LOSS, dense_model, dp_model, flat, identities, one_step, seal_row_content

from tan_keras import _validate
from tan_keras.mechanism import chunking, ghost, layerwise, per_example
from tan_keras.mechanism.clipping import clip_and_sum
from tan_keras.models import build_model

LOSS_FN = per_example.unreduced_loss_fn(LOSS)


class _Var:
    def __init__(self, size):
        self.shape = tf.TensorShape([size])


@pytest.mark.parametrize(
    "batch, params, setting, expected",
    [
        (64, 10_000, "auto", None),  # small model: one pass
        (64, 2_751_562, "auto", 16),  # WRN-16-4: 4 chunks of 16, no padding
        (65, 2_751_562, "auto", 13),  # 5 x 13 rather than 3 x 22 (one padding row)
        (None, 2_751_562, "auto", 24),  # run-time batch: the limit itself
        (10, 1, None, None),
        (10, 1, 4, 4),  # an int is taken as given: 3 chunks, the last padded
        (8, 1, 4, 4),
        (3, 1, 4, None),
        (10, 1, 1, 1),
    ],
)
def test_chunk_size(batch, params, setting, expected):
    assert chunking.chunk_size(batch, [_Var(params)], setting) == expected


@pytest.mark.parametrize("bad", [0, -3, 2.5, "big", "", True])
def test_bad_examples_per_chunk_names_the_argument(bad):
    with pytest.raises(ValueError, match="examples_per_chunk"):
        _validate.examples_per_chunk(bad)


def _case(batch=7, views=2, seed=0):
    model = build_model("small_cnn", (8, 8, 1), 10)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, views, 8, 8, 1)).astype(np.float32)
    x[2] *= 50.0  # clipped
    y = rng.integers(0, 10, batch).astype(np.int32)
    mask = np.ones(batch, np.float32)
    mask[-1] = 0.0  # a padding row
    return model, tf.constant(x), tf.constant(y), tf.constant(mask)


def _whole(per_example_fn, x, y, mask, clip):
    grads, losses, preds = per_example_fn(x, y)
    return clip_and_sum(grads, clip, mask), losses, preds


def _assert_same(got, want):
    (c1, l1, p1), (c2, l2, p2) = got, want
    for a, b in zip(c1.grad_sum, c2.grad_sum):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
    np.testing.assert_allclose(c1.norms.numpy(), c2.norms.numpy(), rtol=1e-5)
    np.testing.assert_array_equal(c1.kept.numpy(), c2.kept.numpy())
    for name in ("num_clipped", "num_nonfinite", "num_examples"):
        assert float(getattr(c1, name)) == float(getattr(c2, name)), name
    np.testing.assert_allclose(l1.numpy(), l2.numpy(), rtol=1e-5)
    np.testing.assert_allclose(p1.numpy(), p2.numpy(), rtol=1e-4, atol=1e-5)


def _per_example_fn(model, method):
    if method == "layerwise":
        return lambda v, labels: layerwise.per_example_gradients(model, LOSS_FN, v, labels)
    # "ghost": every kernel that has a ghost rule, whatever its cost.
    layers = [layer for layer in model.layers if ghost.has_rule(layer)] if method == "ghost" else []
    return lambda v, labels: per_example.per_example_gradients(
        model, LOSS_FN, v, labels, ghost_layers=layers
    )


@pytest.mark.parametrize("method", ["vectorized", "layerwise", "ghost"])
@pytest.mark.parametrize("size", [1, 3, 4, 7])
def test_chunks_equal_the_whole_micro_batch(method, size):
    model, x, y, mask = _case()
    fn = _per_example_fn(model, method)
    want = _whole(fn, x, y, mask, 0.5)
    assert float(want[0].num_clipped) >= 1
    got = chunking.clip_in_chunks(fn, model.trainable_variables, x, y, mask, 0.5, size)
    _assert_same(got, want)


def test_a_non_finite_example_is_dropped_in_its_chunk_only():
    model, x, y, mask = _case()
    x = tf.tensor_scatter_nd_update(x, [[1, 0, 0, 0, 0]], [np.nan])
    fn = lambda v, labels: per_example.per_example_gradients(model, LOSS_FN, v, labels)  # noqa: E731
    want = _whole(fn, x, y, mask, 0.5)
    got = chunking.clip_in_chunks(fn, model.trainable_variables, x, y, mask, 0.5, 3)
    assert float(got[0].num_nonfinite) == 1.0
    _assert_same(got, want)


def test_the_comparison_catches_a_chunker_that_drops_the_last_partial_chunk():
    # Power check: truncating to whole chunks (a classic off-by-one) must fail
    # the equality used above.
    model, x, y, _ = _case(batch=7)
    mask = tf.ones([7])
    fn = lambda v, labels: per_example.per_example_gradients(model, LOSS_FN, v, labels)  # noqa: E731
    want = _whole(fn, x, y, mask, 0.5)
    truncated = chunking.clip_in_chunks(
        fn, model.trainable_variables, x[:6], y[:6], mask[:6], 0.5, 3
    )
    with pytest.raises(AssertionError):
        for a, b in zip(truncated[0].grad_sum, want[0].grad_sum):
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


def test_no_more_than_a_chunk_of_examples_is_processed_at_once():
    model, x, y, mask = _case(batch=7)
    seen = []

    def fn(views, labels):
        seen.append(views.shape[0])
        return per_example.per_example_gradients(model, LOSS_FN, views, labels)

    tf.function(
        lambda: chunking.clip_in_chunks(fn, model.trainable_variables, x, y, mask, 0.5, 3)[0].norms
    )()
    assert seen == [3]


@pytest.mark.parametrize("size,batch,rows", [(1000, 5, 5), (3, 7, 3), (4, 3, 3)])
def test_a_run_time_batch_is_never_padded_beyond_itself(size, batch, rows):
    # With the batch size unknown while tracing, a huge "auto" limit used to
    # pad a micro-batch of 5 up to the limit and compute every padding row.
    model, x, y, mask = _case(batch=batch)
    processed = tf.Variable(0)

    def fn(views, labels):
        with tf.control_dependencies([processed.assign(tf.maximum(processed, tf.shape(views)[0]))]):
            return per_example.per_example_gradients(model, LOSS_FN, tf.identity(views), labels)

    spec = [tf.TensorSpec([None] + x.shape[1:]), tf.TensorSpec([None], tf.int32)]
    run = tf.function(
        lambda v, t, m: chunking.clip_in_chunks(fn, model.trainable_variables, v, t, m, 0.5, size),
        input_signature=spec + [tf.TensorSpec([None])],
    )
    got = run(x, y, mask)
    assert int(processed.numpy()) == rows
    whole = lambda v, t: per_example.per_example_gradients(model, LOSS_FN, v, t)  # noqa: E731
    _assert_same(got, _whole(whole, x, y, mask, 0.5))


def _spy_chunk_sizes(monkeypatch):
    """Records the chunk size DPKerasModel hands to clip_in_chunks."""
    sizes = []
    original = chunking.clip_in_chunks

    def spy(*args, **kwargs):
        sizes.append(args[6])  # the chunk size, after the clip norm
        return original(*args, **kwargs)

    monkeypatch.setattr(chunking, "clip_in_chunks", spy)
    return sizes


@pytest.mark.parametrize("jit_compile", [False, True])
def test_dp_model_with_chunks_matches_one_pass(jit_compile, monkeypatch):
    sizes = _spy_chunk_sizes(monkeypatch)
    base = dense_model(seed=3)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(10, 4)) * 3.0
    y = rng.integers(0, 3, 10)
    dp = dict(l2_norm_clip=0.3, noise_multiplier=0.0, expected_batch_size=10, dataset_size=100)
    results = []
    for setting in (None, 3):
        model = dp_model(base, jit_compile=jit_compile, examples_per_chunk=setting, **dp)
        results.append(flat(one_step(model, x, y, micro=2)))
    # Micro-batches of 5: the chunked model really ran in chunks of 3.
    assert sizes == [None, 3]
    np.testing.assert_allclose(results[0], results[1], atol=1e-6)
    assert not np.allclose(results[0], flat(base.get_weights()))


def test_dp_model_chunks_a_run_time_batch_size(monkeypatch):
    # Batches of unknown static size (a generator dataset) still chunk.
    sizes = _spy_chunk_sizes(monkeypatch)
    base = dense_model(seed=4)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, 4)).astype(np.float32) * 3.0
    y = rng.integers(0, 3, 5).astype(np.int32)
    dp = dict(l2_norm_clip=0.3, noise_multiplier=0.0, expected_batch_size=5, dataset_size=50)
    results = []
    for setting in (None, 2):
        model = dp_model(base, examples_per_chunk=setting, **dp)
        mask = np.ones(5, np.float32)
        identity = seal_row_content((x, y, mask), identities(model, [True], 5)[0]).numpy()
        ds = tf.data.Dataset.from_generator(
            lambda identity=identity, mask=mask: iter([(x, y, mask, np.ones(5, bool), identity)]),
            output_signature=(
                tf.TensorSpec([None, 4], tf.float32),
                tf.TensorSpec([None], tf.int32),
                tf.TensorSpec([None], tf.float32),
                tf.TensorSpec([None], tf.bool),
                tf.TensorSpec([None, 9], tf.int64),
            ),
        )
        model.fit(ds, verbose=0)
        results.append(flat(model.get_weights()))
    assert sizes == [None, 2]
    np.testing.assert_allclose(results[0], results[1], atol=1e-6)


_SMALL_DP = dict(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=4, dataset_size=40)


def test_examples_per_chunk_survives_save_and_load(tmp_path):
    model = dp_model(dense_model(), examples_per_chunk=5, **_SMALL_DP)
    assert model.get_config()["examples_per_chunk"] == 5
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.get_config()["examples_per_chunk"] == 5


def test_dp_model_refuses_a_bad_examples_per_chunk():
    with pytest.raises(ValueError, match=r"examples_per_chunk.*Received: examples_per_chunk=0"):
        dp_model(dense_model(), examples_per_chunk=0, **_SMALL_DP)
