"""Keras 3 projects: `import keras` models train privately, save, reload, resume.

A model written the way a Keras 3 project writes it (functional, Sequential
or subclassed) goes through `make_private`, trains on a Poisson pipeline,
saves to `.keras`, reloads and resumes: the ledger, the EMA and the epsilon
continue as in an uninterrupted run, and the secret noise key never travels
with the file. Another Keras backend, or the legacy Keras 2 behind tf.keras,
is refused when the package loads.
"""

import os
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest

from tan_keras import PrivacyAccountant, make_poisson_dataset, make_private
from tan_keras.keras_dp.dp_model import DPKerasModel
from tan_keras.mechanism.sampling import PoissonSampler

N, B, DELTA = 64, 16, 1e-5
DP = dict(l2_norm_clip=1.0, noise_multiplier=1.2, expected_batch_size=B, dataset_size=N)


@keras.saving.register_keras_serializable(package="tan_keras_tests")
class Classifier(keras.Model):
    """A subclassed Keras 3 model (registered, as saving any custom class needs)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(8, activation="relu")
        self.logits = keras.layers.Dense(3)

    def call(self, x):
        return self.logits(self.hidden(x))


def _functional():
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3)(hidden))


def _sequential():
    return keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)]
    )


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(N, 5)).astype(np.float32), rng.integers(0, 3, N).astype(np.int32)


def _compile(model):
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def _fit(model, steps, sampler):
    x, y = _data()
    accountant = PrivacyAccountant(delta=DELTA)
    history = model.fit(
        make_poisson_dataset(x, y, sampler, steps=steps),
        epochs=1,
        verbose=0,
        callbacks=[accountant],
    )
    return accountant, history


@pytest.mark.parametrize("kind", ["functional", "sequential", "subclassed"])
def test_keras3_model_trains_saves_reloads_and_resumes_with_the_same_epsilon(kind, tmp_path):
    keras.utils.set_random_seed(0)
    base = {"functional": _functional, "sequential": _sequential, "subclassed": Classifier}[kind]()
    input_shape = (5,) if kind == "subclassed" else None
    model = _compile(make_private(base, input_shape=input_shape, ema_decay=0.9, **DP))
    assert isinstance(model, DPKerasModel)
    before = [w.copy() for w in model.get_weights()]
    accountant, history = _fit(model, 3, PoissonSampler(N, B, physical_batch_size=32))
    assert int(model.dp_steps.numpy()) == 3
    assert np.isfinite(history.history["loss"]).all() and "accuracy" in history.history
    assert any(np.abs(a - b).max() > 0 for a, b in zip(model.get_weights(), before))
    eps_3 = accountant.epsilon()

    path = str(tmp_path / "model.keras")
    model.save(path)
    # The noise key is secret state: its value is nowhere in the file.
    key = model.noise_key.numpy()
    assert key.tobytes() not in _saved_bytes(path)
    # Power check: the same search finds the key where a model does save it.
    holder = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    holder.layers[0].bias.assign(key.astype(np.float32).view(np.float32)[:1])
    leaky = str(tmp_path / "leaky.keras")
    holder.save(leaky)
    assert key.astype(np.float32).view(np.float32)[:1].tobytes() in _saved_bytes(leaky)

    loaded = keras.models.load_model(path)
    assert isinstance(loaded, DPKerasModel) and loaded.dp_config == model.dp_config
    assert int(loaded.dp_steps.numpy()) == 3
    assert not np.array_equal(loaded.noise_key.numpy(), key)  # fresh noise from OS entropy
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(loaded.ema_variables, model.ema_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # The optimizer state (momentum) came back too: same next update.
    assert len(loaded.optimizer.variables) == len(model.optimizer.variables)
    for a, b in zip(loaded.optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    reloaded_accountant = PrivacyAccountant(delta=DELTA)
    reloaded_accountant.set_model(loaded)
    assert reloaded_accountant.epsilon() == pytest.approx(eps_3, rel=1e-12)

    # Resume for 2 more steps: the ledger and epsilon are those of 5 steps.
    sampler = PoissonSampler(N, B, physical_batch_size=32)
    sampler.resume_at(3)
    resumed, _ = _fit(loaded, 2, sampler)
    assert int(loaded.dp_steps.numpy()) == 5
    straight = PrivacyAccountant(delta=DELTA)
    straight.set_model(model)
    assert resumed.epsilon() == pytest.approx(straight.epsilon(steps=5), rel=1e-12)
    assert resumed.epsilon() > eps_3


def _saved_bytes(path):
    with zipfile.ZipFile(path) as archive:  # read() decompresses
        return b"".join(archive.read(name) for name in archive.namelist())


def test_make_private_refuses_a_legacy_or_foreign_model():
    class NotKeras:
        name = "legacy"

    with pytest.raises(ValueError, match="expected a Keras 3 model"):
        make_private(NotKeras(), **DP)
    for bad in (5, "5", (5, 0)):
        with pytest.raises(ValueError, match="input_shape"):
            make_private(Classifier(), input_shape=bad, **DP)


def _import_in_subprocess(prelude="", **env):
    return subprocess.run(
        [sys.executable, "-c", prelude + "import tan_keras.keras_dp.dp_model"],
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env},
        capture_output=True,
        text=True,
        check=False,
    )


def test_another_keras_backend_is_refused_at_import():
    # No other backend is installed here: Keras is made to report one, as
    # KERAS_BACKEND=jax would with JAX installed.
    result = _import_in_subprocess("import keras; keras.backend.backend = lambda: 'jax'; ")
    assert result.returncode != 0
    assert "TensorFlow backend" in result.stderr and "'jax'" in result.stderr
    assert _import_in_subprocess().returncode == 0  # power check: the real one passes


def test_legacy_tf_keras_is_refused_at_import():
    result = _import_in_subprocess(TF_USE_LEGACY_KERAS="1")
    assert result.returncode != 0
    assert "TF_USE_LEGACY_KERAS" in result.stderr and "tf_keras" in result.stderr
