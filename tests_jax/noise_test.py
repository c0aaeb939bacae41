"""The noise on the JAX backend: its std, once per step, and a key no file holds."""

import os
import pathlib

import _jax_helpers as helpers
import jax
import keras
import numpy as np
import pytest
from scipy import stats

from tan_keras.jax_dp import example_source, hosts, poisson_steps


def _zero_gradient_loss(y_true, y_pred):
    # The data moves nothing: the update is the noise alone.
    return 0.0 * keras.ops.mean(y_pred)


def _noise(devices=1, key=(5, 9)):
    if devices > 1:
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=jax.devices()[:devices])
        )
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64)])
    dp_model = helpers.private(
        model,
        16,
        batch=4,
        lr=1.0,
        l2_norm_clip=0.5,
        noise_multiplier=2.0,
        loss=_zero_gradient_loss,
    )
    x, y = np.ones((16, 64), "float32"), np.zeros(16, "int32")
    _, changes = helpers.one_step(dp_model, x, y, key=key)
    return helpers.flat(changes)


def _std_is(samples, std) -> bool:
    """Whether `samples` are consistent with N(0, std^2) (two-sided chi-square, alpha 1e-3)."""
    statistic = np.sum(np.square(samples)) / std**2
    n = samples.size
    p = 2 * min(stats.chi2.cdf(statistic, n), stats.chi2.sf(statistic, n))
    return p > 1e-3


@pytest.mark.parametrize("devices", [1, 4])
def test_the_update_noise_has_std_lr_sigma_c_over_b_once(devices):
    noise = _noise(devices)
    expected = 1.0 * 2.0 * 0.5 / 4
    assert _std_is(noise, expected)
    # Power: noise drawn twice (or once per device pair) would be sqrt(2)
    # larger; 1.1x is already told apart with 4160 coordinates.
    assert not _std_is(noise, 1.1 * expected)
    assert not _std_is(noise, expected / 1.1)


def test_each_step_key_gives_other_noise_and_the_same_key_the_same():
    a, b, again = _noise(key=(1, 2)), _noise(key=(3, 4)), _noise(key=(1, 2))
    np.testing.assert_allclose(a, again, atol=1e-6)
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.1


def test_steps_carry_fresh_keys_from_os_entropy():
    x, y = helpers.data(50)
    steps = poisson_steps.poisson_steps(
        example_source.array_rows(x, y), len(x), 0.2, 10, row_multiple=4
    )
    keys = [tuple(next(steps)[2]["noise_key"][0]) for _ in range(20)]
    again = poisson_steps.poisson_steps(
        example_source.array_rows(x, y), len(x), 0.2, 10, row_multiple=4
    )
    assert len(set(keys)) == 20
    assert tuple(next(again)[2]["noise_key"][0]) not in keys


def _recorded_keys(monkeypatch):
    # The step keys and the secret they derive from (its 16 bytes).
    recorded = []
    noise_key, shared_secret = poisson_steps._noise_key, hosts.shared_secret

    def record_key(secret_bytes, draw):
        value = noise_key(secret_bytes, draw)
        recorded.append(value.tobytes())
        return value

    def record_secret():
        value = shared_secret()
        recorded.append(value.to_bytes(16, "little"))
        return value

    monkeypatch.setattr(poisson_steps, "_noise_key", record_key)
    monkeypatch.setattr(hosts, "shared_secret", record_secret)
    return recorded


class _KeyHolder(keras.layers.Layer):
    """Keeps a key in a non-trainable variable: what a model must not do."""

    def build(self, input_shape):
        self.key = self.add_weight(shape=(2,), dtype="uint32", trainable=False)

    def call(self, inputs):
        return inputs


@pytest.mark.parametrize("key_in_a_variable", [False, True])
def test_no_weight_or_file_holds_a_noise_key(tmp_path, monkeypatch, key_in_a_variable):
    # key_in_a_variable is the power check: a key kept in the model, as a
    # non-trainable variable would be, is found by the same scan.
    recorded = _recorded_keys(monkeypatch)
    x, y = helpers.data(40)
    model = helpers.dense_model()
    if key_in_a_variable:
        model = keras.Sequential(
            [keras.Input((6,)), model.layers[0], _KeyHolder(), model.layers[1]]
        )
    dp_model = helpers.private(model, 40, batch=10, noise_multiplier=1.0)
    dp_model.fit(x, y, epochs=2, verbose=0)
    assert len(recorded) >= 8
    if key_in_a_variable:
        model.layers[1].key.assign(np.frombuffer(recorded[-1], np.uint32))
    assert len(dp_model.get_weights()) == 4 + int(key_in_a_variable)
    dp_model.save(tmp_path / "model.keras")
    dp_model.save_weights(tmp_path / "model.weights.h5")
    blobs = [w.tobytes() for w in dp_model.get_weights()]
    blobs += [p.read_bytes() for p in pathlib.Path(tmp_path).iterdir()]
    found = [key for key in recorded if any(key in blob for blob in blobs)]
    assert bool(found) == key_in_a_variable
    assert os.listdir(tmp_path)
