"""Training arrays must hold each example once: a repeated row is one person sampled twice.

Poisson sampling draws every row independently with probability q, and the
accountant charges each step for one example's presence. A row given twice
(oversampling a rare class with `np.repeat`, concatenating a split with
itself, `pd.concat` of overlapping frames) is two independent draws of the
same data: it can be in a step twice, so it moves the update by up to
2 lr C / B, and its privacy loss is that of a group of two, not the epsilon
reported. So `fit` refuses arrays with repeated examples (the same inputs
and the same label, compared exactly, every input and output together),
naming two rows that repeat, before any work is done.

Distinct people can share a record (tabular data with few, coarse columns:
UCI Adult has 24 exact duplicates in 32,561 rows). A caller who knows each
row is a different person says so with `repeated_rows="distinct_people"`:
the rows are then sampled as given (their count is still N). Inputs of one
number per row (a single category or measurement) are not compared: equal
values are what such a column holds, and tell no copy apart.

Imbalanced classes have a private route that needs no copies: a loss that
weights the rare class, clipped per example like any other loss.
"""

from typing import Any, List, Optional, Tuple

import numpy as np

REFUSE, DISTINCT_PEOPLE = "refuse", "distinct_people"
CHOICES = (REFUSE, DISTINCT_PEOPLE)


def _leaves(structure: Any) -> List[Any]:
    if isinstance(structure, dict):
        return [leaf for key in sorted(structure) for leaf in _leaves(structure[key])]
    if isinstance(structure, (list, tuple)):
        return [leaf for item in structure for leaf in _leaves(item)]
    return [] if structure is None else [structure]


def _row_codes(array: np.ndarray) -> np.ndarray:
    """[N] ints, equal exactly where two rows of `array` are equal."""
    rows = array.reshape((len(array), -1))
    if array.dtype == object:  # strings: compared as Python values
        keys = [tuple(row) for row in rows.tolist()]
        index = {}
        return np.array([index.setdefault(key, len(index)) for key in keys], np.int64)
    rows = np.ascontiguousarray(rows)
    width = rows.dtype.itemsize * rows.shape[1]
    if width == 0:
        return np.zeros(len(array), np.int64)
    as_bytes = rows.view(np.dtype((np.void, width))).reshape(-1)
    return np.unique(as_bytes, return_inverse=True)[1].reshape(-1).astype(np.int64)


def first_repeat(features: Any, labels: Any) -> Optional[Tuple[int, int, int]]:
    """The first row that repeats an earlier one, if any.

    Args:
      features: An array of N rows, or a list/dict of such arrays.
      labels: The labels (the same), or None.

    Returns:
      None when every row is distinct, else (earlier row, repeating row,
      number of rows that repeat an earlier one).
    """
    inputs = _compared_inputs(features)
    if inputs is None:
        return None
    arrays = inputs + [np.asarray(leaf) for leaf in _leaves(labels)]
    arrays = [a for a in arrays if a.ndim >= 1]
    if not arrays or len(arrays[0]) < 2:
        return None
    codes = np.stack([_row_codes(a) for a in arrays], axis=1)
    _, first, inverse = np.unique(codes, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    repeats = np.flatnonzero(first[inverse] != np.arange(len(codes)))
    if not len(repeats):
        return None
    row = int(repeats[0])
    return int(first[inverse[row]]), row, int(len(repeats))


def _compared_inputs(features: Any) -> Optional[List[np.ndarray]]:
    """The input arrays whose rows are compared; None for one number per row (module doc)."""
    inputs = [np.asarray(leaf) for leaf in _leaves(features)]
    inputs = [a for a in inputs if a.ndim >= 1]
    numbers_per_row = sum(int(np.prod(a.shape[1:])) for a in inputs)
    if numbers_per_row <= 1 and all(a.dtype != object and a.dtype.kind not in "SU" for a in inputs):
        return None
    return inputs


def shares_a_record(features: Any, others: Any) -> bool:
    """Whether a row of `others` equals a row of `features`, every input together.

    Compared exactly, as repeated rows are (one number per row: not compared).

    Args:
      features: The inputs of N rows (an array, or a list/dict of arrays).
      others: The inputs of M rows, in the same structure.

    Returns:
      True when some row of `others` repeats a row of `features`.
    """
    inputs, more = _compared_inputs(features), _compared_inputs(others)
    if not inputs or not more or len(inputs) != len(more):
        return False
    try:
        joined = [np.concatenate([a, b]) for a, b in zip(inputs, more)]
    except ValueError:  # other row shapes: no row can be equal
        return False
    codes = np.stack([_row_codes(a) for a in joined], axis=1)
    inverse = np.unique(codes, axis=0, return_inverse=True)[1].reshape(-1)
    rows = len(inputs[0])
    return bool(np.isin(inverse[rows:], inverse[:rows]).any())


def check(features: Any, labels: Any, repeated_rows: str) -> None:
    """Refuses training arrays that hold an example twice (module docstring).

    Args:
      features: The training inputs (an array, or a list/dict of arrays).
      labels: Their labels, or None.
      repeated_rows: "refuse", or "distinct_people" to sample repeated rows
        as distinct examples.

    Raises:
      ValueError: naming `repeated_rows` when it is not a choice, or naming
        two equal rows and how many rows repeat.
    """
    if repeated_rows not in CHOICES:
        raise ValueError(
            f"Invalid value for `repeated_rows`: expected one of {list(CHOICES)}. "
            f"Received: repeated_rows={repeated_rows!r}"
        )
    if repeated_rows == DISTINCT_PEOPLE:
        return
    found = first_repeat(features, labels)
    if found is None:
        return
    earlier, row, count = found
    raise ValueError(
        f"The training data holds {count} row(s) that repeat an earlier row (row {row} "
        f"equals row {earlier}, inputs and label): each copy is sampled on its own, so one "
        "example can be in a step twice and its privacy loss is a group's, above the "
        "epsilon reported. Remove the copies (oversampling a rare class: weight it in the "
        "loss instead), or, if each row is a different person who happens to share a "
        "record, pass repeated_rows='distinct_people' to fit."
    )


def refuse_for_input(repeated_rows: Any, received: str, instead: str) -> None:
    """Refuses `repeated_rows` given to `fit` with an input it does not check.

    Args:
      repeated_rows: What `fit` received for it (None when not given).
      received: What `x` is, for the message.
      instead: Where the check is made for such input.

    Raises:
      ValueError: when `repeated_rows` was given: accepted and ignored, it
        would read as a check that never ran.
    """
    if repeated_rows is None:
        return
    raise ValueError(
        f"Invalid value for `repeated_rows`: expected it only with in-memory arrays as "
        f"`x`, whose rows fit compares. Received: repeated_rows={repeated_rows!r} with "
        f"x={received}. {instead}"
    )
