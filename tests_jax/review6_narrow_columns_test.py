"""Narrow data (keras.io's structured data: each feature its own [N, 1] column), JAX.

Review 6 (its scripts a05 and a08, on this backend; the checks are shared
with TensorFlow, `mechanism/data_copies.py`, see tests/keras_dp/) found two
escapes where only wider arrays were refused:

* `validation_data` holding the training records as a dict of [N, 1]
  features, or as one [N, 1] array, trained: val_loss was the noiseless
  training loss and EarlyStopping decided from it. Rows of one number
  were taken for "constant" rows and dropped. Validation records are now
  compared whole, every input of a row together
  (`data_copies.holds_training_records`).
* A one-column feature normalised with a copy of an adapted layer's
  statistics, or with its own mean and variance computed by hand, trained:
  one outlier moved the noiseless update by 11 x lr*C/B. Values under two
  elements were not looked at, and a column's statistic is one number.
  Single-column statistics (mean, variance, std, quantiles, extremes, sums
  and their reciprocals) are now matched as scalars, within 1e-5.

Power checks: the same code with held-out validation records, or with
public constants, trains.
"""

import keras
import numpy as np
import pytest

import tan_keras
from tan_keras.mechanism import data_copies

N, B = 32, 8
COLUMNS = ("age", "chol", "thalach")
DP = dict(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=B, dataset_size=N)


@pytest.fixture(autouse=True)
def _no_registered_rows():
    data_copies.forget()
    yield
    data_copies.forget()


def _columns(seed=0):
    rng = np.random.default_rng(seed)
    x = {c: rng.normal(size=(N, 1)).astype("float32") for c in COLUMNS}
    y = rng.integers(0, 2, size=(N, 1)).astype("float32")
    return x, y


def _dict_model(normalizers=None):
    inputs = {c: keras.Input((1,), name=c) for c in COLUMNS}
    features = [normalizers[c](inputs[c]) if normalizers else inputs[c] for c in COLUMNS]
    hidden = keras.layers.Dense(4, activation="relu")(keras.layers.Concatenate()(features))
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(hidden))


def _single_model():
    return keras.Sequential(
        [keras.Input((1,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(1)]
    )


def _fit(model, x, y, **fit_kwargs):
    private = tan_keras.make_private(model, **DP)
    private.compile(optimizer=keras.optimizers.SGD(0.1), loss="binary_crossentropy")
    try:
        return private.fit(x, y, epochs=1, verbose=0, **fit_kwargs)
    except ValueError:
        assert int(private.dp_steps) == 0  # refused before any update
        raise


# --- Escape A: validation records that are training records -----------------


@pytest.mark.parametrize("part", [slice(None), slice(0, 5)], ids=["all", "part"])
def test_validation_dict_of_one_column_features_is_refused(part):
    x, y = _columns()
    val = ({c: v[part] for c, v in x.items()}, y[part])
    with pytest.raises(ValueError, match=r"`validation_data`.*training records"):
        _fit(_dict_model(), x, y, validation_data=val)


def test_validation_single_feature_column_is_refused():
    x, y = _columns()
    with pytest.raises(ValueError, match=r"`validation_data`.*hold a training value"):
        _fit(_single_model(), x["age"], y, validation_data=(x["age"], y))


def test_validation_refused_without_released_train_metrics():
    x, y = _columns()
    private = tan_keras.make_private(_dict_model(), release_train_metrics=False, **DP)
    private.compile(optimizer="adam", loss="binary_crossentropy")
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", restore_best_weights=True)
    with pytest.raises(ValueError, match=r"`validation_data`"):
        private.fit(x, y, epochs=2, verbose=0, validation_data=(x, y), callbacks=[stop])


def test_held_out_validation_records_train():
    x, y = _columns(0)
    x_val, y_val = _columns(1)
    # A held-out record may share a value with a training record in one column.
    x_val["age"][0] = x["age"][3]
    history = _fit(_dict_model(), x, y, validation_data=(x_val, y_val))
    assert "val_loss" in history.history


def test_held_out_single_feature_trains():
    x, y = _columns(0)
    x_val, y_val = _columns(1)
    history = _fit(_single_model(), x["age"], y, validation_data=(x_val["chol"], y_val))
    assert "val_loss" in history.history


def test_coarse_single_column_is_not_compared():
    # Whole numbers (an age in years): held-out values repeat training ones by chance.
    rng = np.random.default_rng(0)
    x = rng.integers(20, 80, size=(N, 1)).astype("float32")
    x_val = rng.integers(20, 80, size=(N, 1)).astype("float32")
    y = rng.integers(0, 2, size=(N, 1)).astype("float32")
    history = _fit(_single_model(), x, y, validation_data=(x_val, y))
    assert "val_loss" in history.history


# --- Escape B: single-column statistics held by the model -------------------


def _normalizers(x, how):
    layers = {}
    for c in COLUMNS:
        if how == "copy":
            adapted = keras.layers.Normalization()
            adapted.adapt(x[c])
            mean, variance = np.array(adapted.mean).ravel(), np.array(adapted.variance).ravel()
        elif how == "byhand":
            mean, variance = x[c].mean(0), x[c].var(0)
        else:  # public: constants a person writes
            mean, variance = np.zeros(1), np.ones(1)
        layers[c] = keras.layers.Normalization(mean=mean, variance=variance)
    return layers


@pytest.mark.parametrize("how", ["copy", "byhand"])
def test_one_column_statistics_are_refused(how):
    x, y = _columns()
    with pytest.raises(ValueError, match=r"(?s)Normalization.*(adapt|input `age`)"):
        _fit(_dict_model(_normalizers(x, how)), x, y)


def test_statistic_of_a_column_in_a_lambda_is_refused():
    x, y = _columns()
    std = float(x["age"].std())
    model = keras.Sequential(
        [keras.Input((1,)), keras.layers.Lambda(lambda t: t / std), keras.layers.Dense(1)]
    )
    with pytest.raises(ValueError, match=r"std of the input"):
        _fit(model, x["age"], y)


def test_statistic_of_a_column_of_a_wide_array_is_refused():
    x, y = _columns()
    wide = np.concatenate([x[c] for c in COLUMNS], axis=1)
    median = float(np.median(wide[:, 1]))
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Lambda(lambda t: t - median), keras.layers.Dense(1)]
    )
    with pytest.raises(ValueError, match=r"median of a column"):
        _fit(model, wide, y)


def test_public_constants_train():
    x, y = _columns()
    _fit(_dict_model(_normalizers(x, "public")), x, y)


def test_statistics_of_other_data_train():
    # Statistics of other data (a public sample of the same population).
    x, y = _columns()
    other, _ = _columns(seed=7)
    layers = {
        c: keras.layers.Normalization(mean=other[c].mean(0), variance=other[c].var(0))
        for c in COLUMNS
    }
    _fit(_dict_model(layers), x, y)


def test_simple_scalars_are_not_taken_for_statistics():
    # A balanced binary column's mean is 0.5: a dropout rate of 0.5 is no copy.
    binary = np.tile(np.array([[0.0], [1.0]], "float32"), (N // 2, 1))
    y = np.zeros((N, 1), "float32")
    model = keras.Sequential(
        [
            keras.Input((1,)),
            keras.layers.Lambda(lambda t: t * 0.5 + 1.0),
            keras.layers.Dense(4),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(1),
        ]
    )
    _fit(model, binary, y)
