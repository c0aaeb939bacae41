"""Review 5 on the JAX backend: disguising metric names, class weights, split copies.

* A compiled metric named `val_probe` passed the callback check, which
  decided by name: `EarlyStopping(monitor="val_probe")` without validation
  data decided from a noiseless statistic of the training batches how many
  updates to run (measured: 3 updates instead of 2 with one outlier label).
  Such names are refused at fit, before any update, and a monitor naming a
  compiled metric is refused whatever its name.
* `class_weight` is refused with the reason (a table computed from the
  label counts), not only as an argument the model has no use for.
* `validation_split` holding out a copy of a training row trained, while
  the same rows as `validation_data` were refused: refused alike.

Each refusal comes with a variant that trains (the power of the check).
"""

import keras
import numpy as np
import pytest

import tan_keras

N, B, D = 16, 8, 3
METRICS_REFUSED = r"Invalid value for `metrics`: expected names, as Keras logs them"


def _mean_label(y_true, y_pred):
    return y_true[..., 0]


def _private(metrics=(), rows=N):
    keras.utils.set_random_seed(0)
    inp = keras.Input((D,))
    model = keras.Model(inp, keras.layers.Dense(1, kernel_initializer="zeros")(inp))
    private = tan_keras.make_private(
        model,
        l2_norm_clip=1.0,
        noise_multiplier=1.0,
        expected_batch_size=B,
        dataset_size=rows,
        examples_per_chunk=4,
    )
    private.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", metrics=list(metrics))
    return private


def _xy(rows=N, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(rows, D)).astype("float32"), np.ones((rows, 1), "float32")


def _stop_on(monitor):
    return keras.callbacks.EarlyStopping(monitor=monitor, mode="max", patience=0)


@pytest.mark.parametrize("name", ["val_probe", "epsilon", "eta", "noisy_clipped_fraction"])
def test_a_metric_named_like_a_held_out_or_package_log_is_refused_before_any_update(name):
    model = _private([keras.metrics.MeanMetricWrapper(_mean_label, name=name)])
    x, y = _xy()
    with pytest.raises(ValueError, match=METRICS_REFUSED):
        model.fit(x, y, epochs=3, verbose=0, callbacks=[_stop_on(name)])
    assert int(model.dp_steps) == 0


def test_power_check_a_plain_name_monitored_on_held_out_rows_trains():
    model = _private([keras.metrics.MeanMetricWrapper(_mean_label, name="probe")])
    x, y = _xy()
    held = _xy(4, seed=1)
    history = model.fit(
        x, y, epochs=3, verbose=0, validation_data=held, callbacks=[_stop_on("val_probe")]
    )
    assert "val_probe" in history.history and int(model.dp_steps) > 0


def test_class_weight_is_refused_with_its_reason():
    model = _private()
    x, y = _xy()
    with pytest.raises(ValueError, match=r"Invalid value for `class_weight`.*label counts"):
        model.fit(x, y, epochs=1, verbose=0, class_weight={0: 1.0, 1: 2.0})
    assert int(model.dp_steps) == 0


def _split_data(copy):
    x, y = _xy(N + 4, seed=2)
    y = np.random.default_rng(3).normal(size=y.shape).astype("float32")
    if copy:
        x[-1], y[-1] = x[0], y[0]  # the last (held-out) row is training row 0
    return x, y


def test_validation_split_holding_out_a_copy_of_a_training_row_is_refused():
    model = _private()
    x, y = _split_data(copy=True)
    with pytest.raises(ValueError, match=r"Invalid value for `validation_split`"):
        model.fit(x, y, epochs=1, verbose=0, validation_split=0.2)
    assert int(model.dp_steps) == 0


def test_power_check_validation_split_without_copies_trains():
    model = _private()
    x, y = _split_data(copy=False)
    history = model.fit(
        x, y, epochs=1, verbose=0, validation_split=0.2, callbacks=[_stop_on("val_loss")]
    )
    assert "val_loss" in history.history and int(model.dp_steps) > 0
