"""Tests of the dataset loaders: offline digits, mocked tfds, fail-fast errors."""

import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tan_keras.data import datasets


@pytest.fixture(scope="module")
def digits():
    return datasets.load_digits()


def test_digits_shapes_and_ranges(digits):
    assert digits.name == "digits" and digits.num_classes == 10
    assert digits.train_x.shape == (1437, 8, 8, 1)
    assert digits.test_x.shape == (360, 8, 8, 1)
    assert digits.train_x.dtype == np.float32 and digits.train_y.dtype == np.int32
    assert digits.train_x.min() == 0.0 and digits.train_x.max() == 1.0
    assert digits.size == 1437
    assert digits.input_shape == (8, 8, 1)
    assert set(np.unique(digits.train_y)) == set(range(10))


def test_digits_split_is_stratified(digits):
    # ~180 images per class, 20% held out: 35 to 37 of each in the test set.
    counts = np.bincount(digits.test_y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37


def test_digits_split_is_deterministic(digits):
    again = datasets.load_digits()
    np.testing.assert_array_equal(again.train_x, digits.train_x)
    np.testing.assert_array_equal(again.test_y, digits.test_y)
    other = datasets.load_digits(seed=1)
    assert not np.array_equal(other.test_y, digits.test_y)


def test_load_dataset_defaults_to_digits(digits):
    loaded = datasets.load_dataset()
    assert loaded.name == "digits"
    np.testing.assert_array_equal(loaded.train_y, digits.train_y)


@pytest.mark.parametrize("name, num_classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_from_mocked_tfds(name, num_classes):
    with tfds.testing.mock_data(num_examples=6):
        data = datasets.load_dataset(name)
    assert data.name == name and data.num_classes == num_classes
    assert data.train_x.shape == (6, 32, 32, 3) and data.test_x.shape == (6, 32, 32, 3)
    assert data.train_x.dtype == np.float32 and data.train_y.dtype == np.int32
    assert 0.0 <= data.train_x.min() and data.train_x.max() <= 1.0
    assert np.all((0 <= data.train_y) & (data.train_y < num_classes))
    assert data.size == 6


def test_imagenet_from_mocked_tfds_is_random_access():
    with tfds.testing.mock_data(num_examples=3):
        data = datasets.load_dataset("imagenet2012")
        assert data.size == 3 and data.num_classes == 1000
        assert data.input_shape == (224, 224, 3)
        batch = data.train_x[np.array([2, 0])]
        labels = data.train_y[[2, 0]]
    assert batch.shape == (2, 224, 224, 3) and batch.dtype == np.float32
    assert 0.0 <= batch.min() and batch.max() <= 1.0
    assert labels.shape == (2,) and labels.dtype == np.int32


@pytest.mark.parametrize(
    "name, needle",
    [
        ("cifar10", "tfds build cifar10 --data_dir="),
        ("imagenet2012", "downloads/manual"),
    ],
)
def test_unprepared_dataset_fails_fast_with_instructions(tmp_path, name, needle):
    start = time.monotonic()
    with pytest.raises(datasets.DatasetUnavailableError) as error:
        datasets.load_dataset(name, data_dir=str(tmp_path))
    assert time.monotonic() - start < 10.0
    message = str(error.value)
    assert needle in message and "tfds build" in message and str(tmp_path) in message
    assert "\n" not in message  # One paragraph.
    assert isinstance(error.value, ValueError)
    # Nothing was downloaded or prepared.
    assert not (tmp_path / name).exists() or not any((tmp_path / name).rglob("*.tfrecord*"))


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: datasets.load_dataset("mnist"), "dataset"),
        (lambda: datasets.load_tfds("imagenet2012"), "dataset"),
        (lambda: datasets.load_digits(test_fraction=1.0), "test_fraction"),
        (lambda: datasets.load_digits(seed=-1), "seed"),
    ],
)
def test_bad_arguments_are_refused(call, name):
    with pytest.raises(ValueError, match=f"Invalid value for `{name}`"):
        call()


def test_array_dataset_refuses_mismatched_labels():
    x = np.zeros((3, 2, 2, 1), np.float32)
    with pytest.raises(ValueError, match="Invalid value for `train_y`"):
        datasets.ArrayDataset(x, np.zeros(2, np.int32), x, np.zeros(3, np.int32), 2, "toy")
