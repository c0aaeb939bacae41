"""Review 5 (TensorFlow): names that disguised a noiseless statistic, class weights, split copies.

* A compiled metric named `val_probe` (or `epsilon`, or another key the
  package writes) passed the callback check, which decided by name:
  `EarlyStopping(monitor="val_probe")` without validation data decided from
  a noiseless statistic of the training batches how many updates to run.
  Such names are refused at compile, at fit and where the step is traced.
* `class_weight` from the training label counts (keras.io's 1 / count)
  moved an update by 3.67 times the replace-one bound: refused.
* `validation_split` holding out a copy of a training row trained, while
  the same rows as `validation_data` were refused: refused alike.

Each refusal comes with a power check: the variant that trains, or the
escape measured with the refusal bypassed.
"""

import keras
import numpy as np
import pytest

import tan_keras
from tan_keras.keras_dp import callback_checks
from tan_keras.mechanism import sampling

B, N, D = 8, 16, 4
METRICS_REFUSED = r"Invalid value for `metrics`: expected names, as Keras logs them"


def _mean_label(y_true, y_pred):
    return y_true[..., 0]


def _probe(name):
    """A metric that logs the mean training label: a noiseless statistic."""
    return keras.metrics.MeanMetricWrapper(_mean_label, name=name)


def _private(metrics=(), outputs=None, **dp_kwargs):
    keras.utils.set_random_seed(0)
    inp = keras.Input((D,))
    out = outputs(inp) if outputs else keras.layers.Dense(1, kernel_initializer="zeros")(inp)
    private = tan_keras.make_private(
        keras.Model(inp, out),
        l2_norm_clip=1.0,
        noise_multiplier=0.0,
        expected_batch_size=B,
        dataset_size=N,
        clipping="vectorized",
        **dp_kwargs,
    )
    private.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", metrics=list(metrics))
    return private


def _data(first_label=1.0):
    x = np.random.default_rng(0).normal(size=(N, D)).astype("float32")
    y = np.ones((N, 1), "float32")
    y[0] = first_label
    return x, y


def _row_0_in_step_1_only():
    """A sampler seed drawing row 0 in step 1 but not in steps 0 and 2."""
    for seed in range(1, 500):
        sampler = sampling.PoissonSampler(N, B, seed=seed)
        drawn = [0 in sampler.sample_indices(step).numpy() for step in range(3)]
        if drawn == [False, True, False]:
            return seed
    raise AssertionError("no seed samples row 0 in step 1 only")


def _updates_stopped_by(model, monitor, first_label, validation_data=None):
    """Updates of 4 one-step epochs, EarlyStopping(mode="max") on `monitor`."""
    x, y = _data(first_label)
    sampler = sampling.PoissonSampler(N, B, seed=_row_0_in_step_1_only(), physical_batch_size=N)
    stop = keras.callbacks.EarlyStopping(monitor=monitor, mode="max", patience=0)
    model.fit(
        sampling.make_poisson_dataset(x, y, sampler),
        steps_per_epoch=1,
        epochs=4,
        verbose=0,
        callbacks=[stop],
        validation_data=validation_data,
    )
    return int(model.dp_steps.numpy())


# ------------------------------------------------------------- metric names
@pytest.mark.parametrize(
    "name", ["val_probe", "epsilon", "eta", "dp_steps", "noisy_clipped_fraction", "grad_norm"]
)
def test_a_metric_named_like_a_held_out_or_package_log_is_refused_at_compile(name):
    with pytest.raises(ValueError, match=METRICS_REFUSED):
        _private(metrics=[_probe(name)])


def test_a_metric_renamed_after_compile_is_refused_at_fit_before_any_update():
    probe = _probe("probe")
    model = _private(metrics=[probe])
    probe.name = "val_probe"
    with pytest.raises(ValueError, match=METRICS_REFUSED):
        _updates_stopped_by(model, "val_probe", 100.0)
    assert int(model.dp_steps.numpy()) == 0


def test_an_output_whose_loss_is_logged_as_val_loss_is_refused():
    def two_outputs(inp):
        return [keras.layers.Dense(1, name="val")(inp), keras.layers.Dense(1, name="b")(inp)]

    with pytest.raises(ValueError, match=r"Invalid value for `loss`: .*'val_loss'"):
        _private(outputs=two_outputs)


def test_a_monitor_naming_a_compiled_metric_is_refused_whatever_its_name():
    stop = keras.callbacks.EarlyStopping(monitor="val_probe")
    with pytest.raises(ValueError, match=r"monitor=\.\.\.\)`"):
        callback_checks.check_callbacks([stop], True, compiled_names={"val_probe"})
    # Power check: the same monitor, Keras's held-out key, passes.
    callback_checks.check_callbacks([stop], True, compiled_names={"probe"})


@pytest.mark.parametrize("key", ["val_probe", "epsilon", "dp_steps"])
def test_train_step_logs_under_a_disguising_key_are_refused(key):
    with pytest.raises(ValueError, match=r"Invalid value for `metrics`: expected train step logs"):
        callback_checks.check_step_logs(["loss", "grad_norm", key])
    callback_checks.check_step_logs(["loss", "grad_norm", "noisy_clipped_fraction", "probe"])


def _with_own_compute_metrics(model, key):
    """`model` as an instance of a subclass whose compute_metrics logs `key`."""

    class OwnMetrics(type(model)):
        def compute_metrics(self, x, y, y_pred, sample_weight=None):
            logs = super().compute_metrics(x, y, y_pred, sample_weight)
            return {**logs, key: keras.ops.mean(y)}

    model.__class__ = OwnMetrics
    return model


def test_a_compute_metrics_of_ones_own_logging_a_val_key_is_refused_before_any_update():
    model = _with_own_compute_metrics(_private(), "val_probe")
    with pytest.raises(ValueError, match=r"expected train step logs whose keys"):
        _updates_stopped_by(model, "val_probe", 100.0)
    assert int(model.dp_steps.numpy()) == 0


def test_power_check_a_compute_metrics_of_ones_own_with_a_plain_key_trains():
    model = _with_own_compute_metrics(_private(), "probe")
    x, y = _data()
    history = model.fit(x, y, batch_size=B, epochs=1, verbose=0)
    assert "probe" in history.history and int(model.dp_steps.numpy()) >= 1


def test_a_held_out_metric_of_a_plainly_named_training_metric_drives_early_stopping():
    model = _private(metrics=[_probe("probe")])
    x, y = _data()
    # The held-out rows are not training rows (labels 1: no improvement).
    held = (x[:4] + 10.0, y[:4])
    assert _updates_stopped_by(model, "val_probe", 1.0, validation_data=held) == 2


def test_power_check_bypassed_a_val_named_training_metric_counts_updates_by_one_label(
    monkeypatch,
):
    # All three checks off: compile's and fit's names, the traced step's keys.
    # Row 0's label raises the training mean in epoch 1 only: one more update.
    monkeypatch.setattr(callback_checks, "check_compiled_names", lambda model: set())
    monkeypatch.setattr(callback_checks, "check_step_logs", lambda keys: None)
    clean = _updates_stopped_by(_private(metrics=[_probe("val_probe")]), "val_probe", 1.0)
    outlier = _updates_stopped_by(_private(metrics=[_probe("val_probe")]), "val_probe", 100.0)
    assert clean == 2 and outlier > clean


# ------------------------------------------------------------ class weights
def _classifier():
    keras.utils.set_random_seed(0)
    inp = keras.Input((2,))
    out = keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")(inp)
    private = tan_keras.make_private(
        keras.Model(inp, out),
        l2_norm_clip=1.0,
        noise_multiplier=0.0,
        expected_batch_size=N,
        dataset_size=N,
    )
    private.compile(
        optimizer=keras.optimizers.SGD(1.0),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
    )
    return private


def _imbalanced():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 2)).astype("float32")
    y = (np.arange(N) >= 12).astype("float32")[:, None]
    return x, y


def test_class_weight_from_the_label_counts_is_refused_before_any_update():
    model = _classifier()
    x, y = _imbalanced()
    counts = np.bincount(y[:, 0].astype(int))
    with pytest.raises(ValueError, match=r"Invalid value for `class_weight`.*label counts"):
        model.fit(x, y, batch_size=N, verbose=0, class_weight={0: 1 / counts[0], 1: 1 / counts[1]})
    assert int(model.dp_steps.numpy()) == 0


def test_power_check_the_same_fit_without_class_weight_trains():
    model = _classifier()
    x, y = _imbalanced()
    model.fit(x, y, batch_size=N, verbose=0)
    assert int(model.dp_steps.numpy()) >= 1
    assert np.any(model.get_weights()[0] != 0)


# ------------------------------------------------------ validation_split copies
def _split_data(copy):
    rows = N + 4  # 4 held out by validation_split=0.2
    x = np.random.default_rng(1).normal(size=(rows, D)).astype("float32")
    y = np.random.default_rng(2).normal(size=(rows, 1)).astype("float32")
    if copy:
        x[-1], y[-1] = x[0], y[0]  # the last (held-out) row is training row 0
    return x, y


def _fit_split(model, copy):
    x, y = _split_data(copy)
    stop = keras.callbacks.EarlyStopping(monitor="val_loss")
    return model.fit(
        x, y, batch_size=B, epochs=1, validation_split=0.2, verbose=0, callbacks=[stop]
    )


def test_validation_split_holding_out_a_copy_of_a_training_row_is_refused():
    model = _private()
    with pytest.raises(ValueError, match=r"Invalid value for `validation_split`"):
        _fit_split(model, copy=True)
    assert int(model.dp_steps.numpy()) == 0


def test_power_check_validation_split_without_copies_trains():
    model = _private()
    history = _fit_split(model, copy=False)
    assert "val_loss" in history.history and int(model.dp_steps.numpy()) >= 1
