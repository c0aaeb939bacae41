"""Review round 6: a loss reading a compiled metric's running value (TensorFlow).

The metrics update on whole micro-batches outside the clipping; a loss
scaled by `1 + tracker.result()` would carry earlier batches' examples,
unclipped, into every later example's gradient (measured on JAX: 8.58
lr*C/B from an example absent from the step). On TensorFlow the trace of
the metrics update refuses it, before any update.
"""

import keras
import numpy as np
import pytest
from keras import ops

import tan_keras

ROWS, BATCH = 16, 8


def _fit(reads_the_metric):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    dp_model = tan_keras.make_private(
        model, l2_norm_clip=1.0, noise_multiplier=0.0, expected_batch_size=BATCH, dataset_size=ROWS
    )
    tracker = keras.metrics.MeanSquaredError(name="running_mse")

    def loss(y_true, y_pred):
        scale = 1.0 + ops.stop_gradient(tracker.result()) if reads_the_metric else 1.0
        return ops.mean(ops.square(y_true - y_pred), axis=-1) * scale

    dp_model.compile(keras.optimizers.SGD(0.1), loss, metrics=[tracker])
    x = np.random.default_rng(0).normal(size=(ROWS, 4)).astype("float32")
    try:
        dp_model.fit(x, np.ones((ROWS, 1), "float32"), epochs=1, verbose=0)
    finally:
        steps = int(dp_model.dp_steps)
    return steps


def test_a_loss_reading_a_compiled_metric_is_refused_before_any_update():
    with pytest.raises(ValueError, match=r"`metrics`.*writes the variable `running_mse/"):
        _fit(reads_the_metric=True)


def test_power_check_the_same_loss_without_the_read_trains():
    assert _fit(reads_the_metric=False) > 0
