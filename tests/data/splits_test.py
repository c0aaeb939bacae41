"""The tuning split: disjoint from the private set, drawn from the seed alone."""

import numpy as np
import pytest

from tan_keras.data import datasets, splits


def test_split_parts_are_disjoint_and_cover_the_training_set():
    split = splits.tuning_split(1437, 300, seed=3)
    tuning, private = split.indices("tuning"), split.indices("private")
    assert len(tuning) == 300 and len(private) == 1137
    assert not np.intersect1d(tuning, private).size  # no index in both
    assert np.array_equal(np.union1d(tuning, private), np.arange(1437))
    assert np.all(np.diff(tuning) > 0) and np.all(np.diff(private) > 0)


def test_split_depends_on_the_seed_only():
    # Same (N, n, seed): the same split in every process (search, final run).
    a, b = splits.tuning_split(1000, 100, 0), splits.tuning_split(1000, 100, 0)
    assert np.array_equal(a.tuning_indices, b.tuning_indices)
    other = splits.tuning_split(1000, 100, 1)
    assert not np.array_equal(a.tuning_indices, other.tuning_indices)
    # Uniform, not a prefix or a stride of the data's order.
    assert a.tuning_indices.min() < 100 and a.tuning_indices.max() > 900


@pytest.mark.parametrize(
    "args, name",
    [
        ((1437, 0, 0), "tuning_examples"),
        ((1437, 1437, 0), "tuning_examples"),
        ((1437, 2.5, 0), "tuning_examples"),
        ((1437, 10, -1), "tuning_split_seed"),
        ((1, 1, 0), "dataset_size"),
    ],
)
def test_split_refuses_bad_sizes(args, name):
    with pytest.raises(ValueError, match=f"Invalid value for `{name}`"):
        splits.tuning_split(*args)


def _dataset(n=20):
    x = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1)
    y = np.arange(n, dtype=np.int32) % 3
    return datasets.ArrayDataset(x, y, x[:4], y[:4], num_classes=3, name="toy")


def test_training_part_keeps_exactly_its_rows():
    data, split = _dataset(), splits.tuning_split(20, 6, 0)
    private = splits.training_part(data, split, "private")
    tuning = splits.training_part(data, split, "tuning")
    assert private.size == 14 and tuning.size == 6
    # Row values are the original indices here: each part holds its own only.
    assert np.array_equal(private.train_x.ravel(), split.private_indices)
    assert np.array_equal(tuning.train_x.ravel(), split.tuning_indices)
    assert np.array_equal(private.train_y, data.train_y[split.private_indices])
    assert private.test_x is data.test_x  # the test split is not split
    facts = splits.training_part(
        datasets.known_facts("digits"), splits.tuning_split(1437, 37), "private"
    )
    assert facts.size == 1400
    with pytest.raises(ValueError, match="Invalid value for `tuning_examples`"):
        splits.training_part(data, splits.tuning_split(21, 6, 0), "private")


class _LazyEncoded:
    """A lazy view like ImageNet's: item i is i, its bytes b'<i>'."""

    def __init__(self, n):
        self.shape, self.dtype = (n, 1), np.dtype(np.float32)
        self.decode = lambda jpeg: jpeg

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, index):
        return np.arange(len(self), dtype=np.float32)[index]

    def encoded(self, indices):
        return np.array([str(int(i)).encode() for i in indices], dtype=object)


def test_lazy_views_map_rows_through_the_split():
    base, split = _LazyEncoded(50), splits.tuning_split(50, 10, 2)
    rows = splits.select_rows(base, split.private_indices)
    assert len(rows) == 40 and rows.shape == (40, 1) and rows.decode is base.decode
    assert rows[3] == split.private_indices[3]
    assert np.array_equal(rows[np.array([0, 5])], split.private_indices[[0, 5]])
    assert list(rows.encoded(np.array([1, 2]))) == [
        str(int(i)).encode() for i in split.private_indices[[1, 2]]
    ]
    plain = splits.select_rows(np.arange(50)[:, None], split.tuning_indices)
    assert isinstance(plain, np.ndarray) and plain.ravel().tolist() == split.tuning_indices.tolist()
    no_bytes = splits.select_rows(
        datasets._SourceView([{"k": i} for i in range(5)], "k", lambda v: v, (), np.int32),
        np.array([1, 3]),
    )
    assert not hasattr(no_bytes, "encoded") and no_bytes[np.array([0, 1])].tolist() == [1, 3]
