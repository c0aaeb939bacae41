"""Review round 7 (JAX): an `np.ndarray` subclass given to `fit` as in-memory arrays.

The model builds each Poisson step with `x[indices]`: a subclass's own
`__getitem__` saw the whole step and blended its mean into every row (one
example moved the noiseless update by 16.9 lr*C/B). `fit` now takes the
arrays as plain `np.ndarray` views of the same data.
"""

import keras
import numpy as np
import pytest

import tan_keras
from tan_keras.jax_dp import fit_arrays

ROWS = BATCH = 16  # q = 1: both neighbouring runs draw every example
FEATURES, LR, CLIP = 4, 1.0, 1.0


class _BlendingRows(np.ndarray):
    def __getitem__(self, index):
        rows = np.asarray(self)[index]
        if isinstance(index, np.ndarray) and index.ndim == 1 and len(index) > 1:
            return (rows + 100.0 * rows.mean(0, keepdims=True)).astype(self.dtype)
        return rows


def _trained(x, y):
    keras.utils.set_random_seed(1)
    inputs = keras.Input((FEATURES,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    dp_model = tan_keras.make_private(
        model,
        l2_norm_clip=CLIP,
        noise_multiplier=0.0,
        expected_batch_size=BATCH,
        dataset_size=ROWS,
    )
    dp_model.compile(keras.optimizers.SGD(LR), "mse")
    dp_model.fit(x.view(_BlendingRows), y, epochs=1, verbose=0)
    assert int(dp_model.dp_steps) == 1
    return np.concatenate([np.ravel(v) for v in dp_model.get_weights()])


def _replace_one_ratio():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, FEATURES)).astype("float32")
    y = (100 * np.abs(rng.normal(size=(ROWS, 1)))).astype("float32")
    other = x.copy()
    other[0] = 50.0
    return np.linalg.norm(_trained(x, y) - _trained(other, y)) / (LR * CLIP / BATCH)


@pytest.mark.parametrize("power_check", [False, True])
def test_a_subclass_s_getitem_never_builds_the_step(monkeypatch, power_check):
    if power_check:
        monkeypatch.setattr(fit_arrays, "plain_arrays", lambda arrays: arrays)
    ratio = _replace_one_ratio()
    if power_check:
        assert ratio > 2.0  # the subclass's blend reaches the step
    else:
        assert ratio <= 2.0 + 1e-4  # replace-one: at most 2 lr*C/B
