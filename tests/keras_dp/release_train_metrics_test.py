"""release_train_metrics=False: no noiseless statistic of the training examples leaves fit."""

import keras
import numpy as np
import pytest
from _helpers import LOSS, dense_model, dp_model, micro_batches

from tan_keras.keras_dp.callbacks import PrivacyAccountant
from tan_keras.keras_dp.dp_model import DPKerasModel

DP = dict(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=8, dataset_size=100)
NOISELESS = {"loss", "accuracy", "grad_norm", "clipped_fraction", "nonfinite_examples"}


class _Recorder(keras.callbacks.Callback):
    """Every logs dict the callbacks see during training."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def on_train_batch_end(self, batch, logs=None):
        self.seen.append(dict(logs or {}))

    def on_epoch_end(self, epoch, logs=None):
        self.seen.append(dict(logs or {}))

    def on_train_end(self, logs=None):
        self.seen.append(dict(logs or {}))


def _fit(tmp_path, **dp_kwargs):
    """Two epochs of 3 steps, with validation data and the callbacks users add."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 8, 4)).astype(np.float32)
    y = rng.integers(0, 3, (3, 8))
    model = dp_model(dense_model(), **{**DP, **dp_kwargs})
    # Several steps per execution: Keras's multi-step loop runs on the logs too.
    model.compile(
        optimizer=keras.optimizers.SGD(0.1), loss=LOSS, metrics=["accuracy"], steps_per_execution=2
    )
    recorder = _Recorder()
    history = model.fit(
        micro_batches(x, y, np.ones((3, 8)), np.ones(3, bool), model),
        epochs=2,
        verbose=1,  # the progress bar must cope with empty step logs
        validation_data=(x[0], y[0]),
        callbacks=[
            recorder,
            PrivacyAccountant(delta=1e-5),
            keras.callbacks.TensorBoard(str(tmp_path / "tb")),
            keras.callbacks.EarlyStopping("val_loss", patience=5),
        ],
    )
    return model, history, recorder.seen


def _leaked(history, seen):
    """The noiseless training statistics found in History or in any callback's logs."""
    keys = set(history.history).union(*seen)
    return keys & NOISELESS


def test_nothing_noiseless_reaches_history_callbacks_or_model_metrics(tmp_path):
    model, history, seen = _fit(tmp_path, release_train_metrics=False)
    assert _leaked(history, seen) == set()
    assert set(history.history) == {"val_loss", "val_accuracy", "dp_steps", "epsilon", "eta"}
    assert int(model.dp_steps.numpy()) == 6
    # model.metrics lists no training tracker: its values after fit are the
    # last validation's (held-out data).
    assert {m.name for m in model.metrics} == {"loss", "compile_metrics"}
    results = {k: float(v) for k, v in model.get_metrics_result().items()}
    assert results == pytest.approx(
        {"loss": history.history["val_loss"][-1], "accuracy": history.history["val_accuracy"][-1]}
    )
    # Held-out evaluation works as usual.
    assert set(model.evaluate(np.zeros((4, 4)), np.zeros(4), return_dict=True, verbose=0)) == {
        "loss",
        "accuracy",
    }


def test_power_check_the_default_model_fails_the_same_assertion(tmp_path):
    _, history, seen = _fit(tmp_path)
    assert _leaked(history, seen) == NOISELESS


def test_bad_release_train_metrics_is_refused_by_name():
    inp = keras.Input((4,))
    for value in (1, "False", None):
        with pytest.raises(ValueError, match="Invalid value for `release_train_metrics`"):
            DPKerasModel(inp, keras.layers.Dense(2)(inp), **DP, release_train_metrics=value)
