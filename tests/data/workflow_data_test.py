"""The generated stand-ins of the keras.io workflows: forms, sizes, determinism, refusals."""

import numpy as np
import pytest

from tan_keras.data import workflow_data


def _rows(x):
    return len(next(iter(x.values()))) if isinstance(x, dict) else int(x.shape[0])


@pytest.mark.parametrize(
    "make", ["patients", "review_texts", "shapes", "sensor_series"], ids=lambda name: name
)
def test_sizes_labels_and_determinism(make):
    function = getattr(workflow_data, make)
    (x, y), (x_test, y_test) = function(num_train=50, num_test=20)
    assert _rows(x) == len(y) == 50 and _rows(x_test) == len(y_test) == 20
    assert y.shape == (50,) and y.dtype == np.int64 and y.min() >= 0
    (_, again), _ = function(num_train=50, num_test=20)
    np.testing.assert_array_equal(y, again)
    (_, other), _ = function(num_train=50, num_test=20, seed=1)
    assert not np.array_equal(y, other)


def test_forms_the_keras_io_models_expect():
    (x, _), _ = workflow_data.patients(10, 5)
    assert x["thal"].dtype.name == "string" and x["age"].dtype == np.float32
    (texts, _), _ = workflow_data.review_texts(10, 5)
    words = set(b" ".join(texts.numpy()).decode().split())
    assert words <= set(workflow_data.review_words())
    (images, labels), _ = workflow_data.shapes(40, 5, num_classes=8)
    assert images.shape == (40, 32, 32, 3) and images.dtype == np.uint8 and labels.max() <= 7
    (series, _), _ = workflow_data.sensor_series(10, 5, length=64)
    assert series.shape == (10, 64, 1)
    np.testing.assert_allclose(series.std(axis=1), 1.0, rtol=1e-4)


@pytest.mark.parametrize(
    "make, kwargs, name",
    [
        ("patients", dict(num_train=0), "num_train"),
        ("review_texts", dict(num_test=-1), "num_test"),
        ("shapes", dict(num_classes=5), "num_classes"),
        ("shapes", dict(image_size=4), "image_size"),
        ("sensor_series", dict(length=8), "length"),
    ],
)
def test_bad_arguments_are_refused_by_name(make, kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        getattr(workflow_data, make)(**kwargs)
