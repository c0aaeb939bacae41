"""A tuning split held out of the private training set, disjoint by construction.

Hyper-parameters chosen by looking at runs on the private examples are a
function of those examples that no DP guarantee covers (Papernot and
Steinke, ICLR 2022). Holding out a tuning subset fixes that: the search
trains only on the tuning examples, the private run only on the others, so
its (epsilon, delta) covers every example it trains on, the choice of its
hyper-parameters included. The tuning examples get no guarantee.

The split is a uniformly random subset drawn from a public seed and the
number of examples only, never from the data (a split stratified by label
would make who is in the private set depend on the private labels). The same
(N, size, seed) always gives the same split, so the search and the final run
(separate processes, maybe separate machines) agree on it.
"""

import dataclasses
from typing import Any

import numpy as np

from tan_keras import _validate

# The two parts of a split a run can train on.
PARTS = ("private", "tuning")


@dataclasses.dataclass(frozen=True, eq=False)
class TuningSplit:
    """The two disjoint parts of a training set of N examples.

    Attributes:
      tuning_indices: Sorted indices of the tuning examples (int64).
      private_indices: Sorted indices of the other examples, the private set.
      seed: The public seed the split was drawn from.
    """

    tuning_indices: np.ndarray
    private_indices: np.ndarray
    seed: int

    @property
    def dataset_size(self) -> int:
        """N of the whole training set."""
        return len(self.tuning_indices) + len(self.private_indices)

    def indices(self, part: str) -> np.ndarray:
        """The indices of `part` ("private" or "tuning").

        Raises:
          ValueError: if `part` is neither.
        """
        part = _validate.one_of("train_on", part, PARTS)
        return self.private_indices if part == "private" else self.tuning_indices


def tuning_split(dataset_size: int, tuning_examples: int, seed: int = 0) -> TuningSplit:
    """Draws the tuning subset of a training set of `dataset_size` examples.

    Args:
      dataset_size: N, the number of training examples, >= 2.
      tuning_examples: How many to hold out for tuning, in [1, N - 1].
      seed: Public seed of the draw, >= 0.

    Returns:
      The `TuningSplit`: a uniformly random subset of `tuning_examples`
      indices and its complement.

    Raises:
      ValueError: naming the argument, if a value is out of range.
    """
    n = _validate.integer(
        "dataset_size",
        dataset_size,
        low=2,
        hint="A split needs a tuning and a private example at least",
    )
    size = _validate.integer(
        "tuning_examples",
        tuning_examples,
        low=1,
        high=n - 1,
        hint=f"The training split has N={n} examples; the private set keeps at least one",
    )
    seed = _validate.integer("tuning_split_seed", seed, low=0)
    # Keyed by the seed alone (not the data): the same subset on every host.
    order = np.random.default_rng(seed).permutation(n)
    return TuningSplit(
        tuning_indices=np.sort(order[:size]).astype(np.int64),
        private_indices=np.sort(order[size:]).astype(np.int64),
        seed=seed,
    )


def select_rows(rows: Any, indices: np.ndarray) -> Any:
    """The rows `indices` of a training array, as the same kind of array.

    Args:
      rows: A numpy array, or a lazy random-access view (with `shape`,
        `dtype`, `len()` and fancy indexing; with `encoded` and `decode` for
        encoded images).
      indices: Sorted row indices.

    Returns:
      A numpy array (a copy) for a numpy array, else a lazy view of the rows.
    """
    if isinstance(rows, np.ndarray):
        return rows[indices]
    if hasattr(rows, "encoded"):
        return _EncodedRows(rows, indices)
    return _Rows(rows, indices)


class _Rows:
    """A lazy view of some rows of a lazy array-like view (row i -> base[indices[i]])."""

    def __init__(self, base: Any, indices: np.ndarray):
        self._base = base
        self._indices = np.asarray(indices, np.int64)
        self.shape = (len(self._indices), *tuple(base.shape[1:]))
        self.dtype = base.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return self._base[int(self._indices[index])]
        return self._base[self._indices[index]]


class _EncodedRows(_Rows):
    """`_Rows` of encoded images: the bytes of the selected rows, and the decoder."""

    def __init__(self, base: Any, indices: np.ndarray):
        super().__init__(base, indices)
        self.decode = base.decode

    def encoded(self, indices) -> np.ndarray:
        """The encoded bytes of rows `indices` of this view."""
        return self._base.encoded(self._indices[np.asarray(indices, np.int64)])


def training_part(dataset: Any, split: TuningSplit, part: str) -> Any:
    """`dataset` with only one part of the split as its training set.

    Args:
      dataset: A `datasets.ArrayDataset` (its test split is kept whole), or
        the `datasets.DatasetFacts` of a dry run without data.
      split: A `TuningSplit` of its training set.
      part: "private" or "tuning".

    Returns:
      The same kind of object, whose N (`size`) is the part's.

    Raises:
      ValueError: if the split was drawn for another N, or `part` is unknown.
    """
    if split.dataset_size != dataset.size:
        raise _validate.invalid(
            "tuning_examples",
            f"a split of this training set's N={dataset.size} examples",
            len(split.tuning_indices),
            f"It was drawn for N={split.dataset_size}",
        )
    indices = split.indices(part)
    if not hasattr(dataset, "train_x"):
        return dataclasses.replace(dataset, size=len(indices))
    return dataclasses.replace(
        dataset,
        train_x=select_rows(dataset.train_x, indices),
        train_y=select_rows(dataset.train_y, indices),
    )
