"""Review round 6 (JAX): a loss that reads a compiled metric's running value.

The metrics update on whole batches outside the clipping; a loss scaled by
`1 + tracker.result()` (a running training error also passed in `metrics=`)
read their state inside every example's loss: an example drawn in step 1
only moved step 2's noiseless update by 8.58 lr*C/B (0 allowed). Refused
now, and by construction a loss sees the metrics at zero.
"""

import keras
import numpy as np
import pytest
from keras import ops

import tan_keras
from tan_keras.jax_dp import example_loss, hosts

ROWS, BATCH, CLIP = 16, 8, 10.0
SECRET = 12345


def _draws():
    # The Poisson steps `fit` draws from SECRET (poisson_steps.py's sampler).
    rng = np.random.Generator(np.random.PCG64(SECRET))
    return [np.flatnonzero(rng.random(ROWS) < BATCH / ROWS) for _ in range(2)]


class _NoStepZero(keras.optimizers.schedules.LearningRateSchedule):
    # Learning rate 0 at the first update: both runs enter step 2 with the same weights.
    def __call__(self, step):
        return ops.where(step < 1, 0.0, 1.0)

    def get_config(self):
        return {}


def _step_two_weights(labels):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, kernel_initializer="zeros")])
    dp_model = tan_keras.make_private(
        model,
        l2_norm_clip=CLIP,
        noise_multiplier=0.0,
        expected_batch_size=BATCH,
        dataset_size=ROWS,
    )
    tracker = keras.metrics.MeanSquaredError(name="running_mse")

    def scaled_by_the_running_error(y_true, y_pred):
        scale = 1.0 + ops.stop_gradient(tracker.result())
        return ops.mean(ops.square(y_true - y_pred), axis=-1) * scale

    dp_model.compile(
        keras.optimizers.SGD(_NoStepZero()), scaled_by_the_running_error, metrics=[tracker]
    )
    x = np.random.default_rng(0).normal(size=(ROWS, 4)).astype("float32") * 0.1
    dp_model.fit(x, labels, epochs=1, verbose=0)
    assert int(dp_model.dp_steps) == 2
    return np.concatenate([np.ravel(w) for w in dp_model.get_weights()])


def _difference(monkeypatch):
    monkeypatch.setattr(hosts, "shared_secret", lambda *args, **kwargs: SECRET)
    first, second = _draws()
    outside = [i for i in first if i not in second][0]
    labels = np.full((ROWS, 1), 0.5, "float32")
    other = labels.copy()
    other[outside] = 30.0  # drawn in step 1 only
    return np.linalg.norm(_step_two_weights(labels) - _step_two_weights(other)) / (CLIP / BATCH)


def test_a_loss_reading_a_compiled_metric_is_refused_naming_it(monkeypatch):
    monkeypatch.setattr(hosts, "shared_secret", lambda *args, **kwargs: SECRET)
    with pytest.raises(ValueError, match=r"`loss`.*reads the metric variable `running_mse/"):
        _step_two_weights(np.full((ROWS, 1), 0.5, "float32"))


def test_without_the_refusal_the_loss_sees_no_earlier_batch(monkeypatch):
    monkeypatch.setattr(example_loss, "_refuse_metric_reads", lambda read: None)
    assert _difference(monkeypatch) < 1e-6


def test_power_check_with_the_running_values_the_earlier_example_moves_step_two(monkeypatch):
    monkeypatch.setattr(example_loss, "_refuse_metric_reads", lambda read: None)
    monkeypatch.setattr(example_loss, "metric_values_in_the_loss", lambda state: list(state))
    assert _difference(monkeypatch) > 1.0
