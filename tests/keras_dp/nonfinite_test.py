"""Non-finite inputs or per-example gradients never reach the weights.

clipping.py promises: an example whose (view-averaged) gradient has a NaN or
Inf anywhere is zeroed as a whole and counted in `nonfinite_examples`; padded
rows never count; the logical step still happens (it is a noisy update like
any other and is accounted). Each test compares against a reference run in
which the bad example is masked out, with the same noise seed, so the weights
must match exactly -- noise included. tests/keras_dp/dp_model_test.py covers the basic
case (one NaN input, K = 1, one micro-batch, no noise); here: Inf, NaN in one
view of K, gradient accumulation, jit_compile, both per-example gradient
methods, finite inputs with a non-finite gradient, padding, all rows bad.
"""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from _helpers import dense_model, dp_model, flat, micro_batches

from tan_keras.mechanism import noise

BATCH = 8
BAD = 2  # index of the bad example
DP = dict(
    l2_norm_clip=0.5,
    noise_multiplier=1.0,
    expected_batch_size=BATCH,
    dataset_size=100,
    noise_seed=11,
)


@pytest.fixture(autouse=True)
def _quiet_seeded_noise():
    # A fixed noise seed makes the runs comparable; the warning is expected.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", noise.NotPrivateWarning)
        yield


def _data(augmult=1, seed=0):
    rng = np.random.default_rng(seed)
    shape = (BATCH, 4) if augmult == 1 else (BATCH, augmult, 4)
    return rng.normal(size=shape).astype(np.float32), rng.integers(0, 3, BATCH).astype(np.int32)


def _fit(model, x, y, mask=None, micro=1, steps=1):
    """Fits `steps` identical logical steps of `micro` micro-batches each.

    Returns:
      (final weights, fit history dict).
    """
    mask = np.ones(len(x), np.float32) if mask is None else np.asarray(mask, np.float32)
    size = len(x) // micro
    ends = [i == micro - 1 for i in range(micro)]
    ds = micro_batches(
        np.tile(x.reshape((micro, size) + x.shape[1:]), (steps,) + (1,) * x.ndim),
        np.tile(y.reshape(micro, size), (steps, 1)),
        np.tile(mask.reshape(micro, size), (steps, 1)),
        np.tile(np.repeat(np.asarray(ends)[:, None], size, axis=1), (steps, 1)),
        model,
    )
    history = model.fit(ds, epochs=1, verbose=0)
    return [v.numpy() for v in model.trainable_variables], history.history


def _assert_finite(weights):
    assert all(np.all(np.isfinite(w)) for w in weights)


def _without_bad_example():
    return np.r_[np.ones(BAD), 0.0, np.ones(BATCH - BAD - 1)]


# (bad value, augmult K, micro-batches, jit_compile, per-example gradient method)
SETTINGS = [
    (np.nan, 1, 2, False, "layerwise"),
    (-np.inf, 3, 2, True, "layerwise"),
    (np.inf, 1, 2, False, "vectorized"),
    (np.nan, 3, 2, True, "vectorized"),
    (np.inf, 3, 2, False, "ghost"),
    (-np.inf, 1, 1, True, "ghost"),
]


@pytest.mark.parametrize("bad_value,augmult,micro,jit,mode", SETTINGS)
def test_nonfinite_input_is_zeroed_counted_and_the_step_taken(bad_value, augmult, micro, jit, mode):
    base = dense_model()
    x, y = _data(augmult)
    bad = x.copy()
    if augmult == 1:
        bad[BAD, 1] = bad_value
    else:
        # One bad view poisons the example's view-averaged gradient: the whole
        # example (its K views are one privacy unit) must go, not just the view.
        bad[BAD, 1, 1] = bad_value
    kwargs = dict(DP, augmult=augmult, clipping=mode)
    model = dp_model(base, jit_compile=jit, **kwargs)
    weights, history = _fit(model, bad, y, micro=micro)
    _assert_finite(weights)
    assert history["nonfinite_examples"] == [1.0]
    assert int(model.dp_steps.numpy()) == 1
    reference, ref_history = _fit(
        dp_model(base, jit_compile=jit, **kwargs), x, y, mask=_without_bad_example(), micro=micro
    )
    assert ref_history["nonfinite_examples"] == [0.0]
    np.testing.assert_allclose(flat(weights), flat(reference), atol=1e-6)


class _SqrtAbs(keras.layers.Layer):
    def call(self, t):
        return tf.sqrt(tf.abs(t))


def _sqrt_model(seed=0):
    """Finite inputs and loss, but the gradient of sqrt(|h|) at h = 0 is NaN.

    h = W x + b with b = 0 at init, so x = 0 gives h = 0: d sqrt(|h|)/dh =
    sign(0) * inf = NaN, which reaches the first layer's kernel and bias.
    """
    keras.utils.set_random_seed(seed)
    inp = keras.Input((4,))
    h = keras.layers.Dense(5)(inp)
    h = _SqrtAbs()(h)
    return keras.Model(inp, keras.layers.Dense(3)(h))


# No "layerwise": a custom layer may mix examples, so that route refuses this model
# (non-finite gradients on the layerwise route are tested above).
@pytest.mark.parametrize("mode,jit", [("vectorized", False), ("ghost", False), ("auto", True)])
def test_finite_input_with_nonfinite_gradient_is_zeroed(mode, jit):
    base = _sqrt_model()
    x, y = _data()
    x[BAD] = 0.0
    model = dp_model(base, jit_compile=jit, **DP, clipping=mode)
    weights, history = _fit(model, x, y, micro=2)
    assert np.isfinite(history["loss"][0])  # the forward pass was finite
    _assert_finite(weights)
    assert history["nonfinite_examples"] == [1.0]
    reference, _ = _fit(
        dp_model(base, jit_compile=jit, **DP, clipping=mode), x, y, _without_bad_example(), 2
    )
    np.testing.assert_allclose(flat(weights), flat(reference), atol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_nonfinite_padding_is_neither_used_nor_counted(jit):
    base = dense_model()
    x, y = _data()
    mask = _without_bad_example()
    reference, _ = _fit(dp_model(base, jit_compile=jit, **DP), x, y, mask)
    x[BAD] = np.nan  # a padded row may hold anything
    weights, history = _fit(dp_model(base, jit_compile=jit, **DP), x, y, mask)
    assert history["nonfinite_examples"] == [0.0]
    np.testing.assert_allclose(flat(weights), flat(reference), atol=1e-6)


@pytest.mark.parametrize("noise_multiplier", [0.0, 1.0])
def test_all_examples_nonfinite_gives_a_pure_noise_step_that_is_counted(noise_multiplier):
    base = dense_model()
    x, y = _data()
    x[:, 0] = np.nan
    kwargs = {**DP, "noise_multiplier": noise_multiplier}
    model = dp_model(base, **kwargs)
    weights, history = _fit(model, x, y, micro=2)
    assert history["nonfinite_examples"] == [float(BATCH)]
    assert int(model.dp_steps.numpy()) == 1
    empty, _ = _fit(dp_model(base, **kwargs), x, y, mask=np.zeros(BATCH), micro=2)
    np.testing.assert_allclose(flat(weights), flat(empty), atol=1e-6)
    moved = np.abs(flat(weights) - flat(base.trainable_variables)).max()
    assert (moved > 0) == (noise_multiplier > 0)


def test_metric_counts_every_bad_example_over_micro_batches_and_steps():
    base = dense_model()
    x, y = _data()
    x[1, 0] = np.nan  # first micro-batch
    x[6, 3] = np.inf  # second micro-batch
    model = dp_model(base, **DP)
    weights, history = _fit(model, x, y, micro=2, steps=3)
    _assert_finite(weights)
    assert history["nonfinite_examples"] == [6.0]  # a Sum over the epoch
    assert int(model.dp_steps.numpy()) == 3


def test_nonfinite_example_does_not_poison_the_loss_metric():
    """A zeroed example is left out of the loss metric (NaN would poison every average)."""
    x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    y = np.zeros(8, np.int32)
    x[2, 1] = np.nan
    model = dp_model(
        dense_model(),
        l2_norm_clip=1.0,
        noise_multiplier=0.0,
        expected_batch_size=8,
        dataset_size=100,
    )
    ds = micro_batches(np.stack([x, x]), np.stack([y, y]), np.ones((2, 8)), [True, True], model)
    history = model.fit(ds, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert history.history["nonfinite_examples"] == [2.0]
    assert int(model.dp_steps.numpy()) == 2
