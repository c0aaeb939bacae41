"""What `fit` accepts on the JAX backend: arrays or a source, checked before any work.

The model draws its Poisson steps itself from the arrays (`poisson_steps`),
so everything that would choose batches for it (`steps_per_epoch`,
`shuffle`, `sample_weight`, `class_weight`, another batch size, several
steps per execution) is refused by name, and `validation_split` holds the
split out of N before any sampling.
"""

from typing import Any, Tuple

import numpy as np
from keras import tree

from tan_keras import _repeated_rows, _validate
from tan_keras.data import image_views
from tan_keras.jax_dp import example_source
from tan_keras.keras_dp import class_weights
from tan_keras.keras_dp.dp_config import DPConfig
from tan_keras.mechanism import held_out


def checked(
    config: DPConfig,
    steps_per_execution: int,
    x: Any,
    y: Any,
    batch_size,
    validation_split,
    validation_data,
    kwargs: dict,
) -> Tuple[Any, Any, Any]:
    """The training arrays and validation data of a private `fit`, checked.

    Args:
      config: The model's DP settings.
      steps_per_execution: The compiled model's.
      x, y, batch_size, validation_split, validation_data: `fit`'s.
      kwargs: `fit`'s other keyword arguments (read, not changed), among
        them `repeated_rows`: "refuse" (the default: training arrays with a
        repeated example are refused, `_repeated_rows.py`) or
        "distinct_people".

    Returns:
      (x, y, validation_data): with a validation split, the training rows
      and the held-out ones.

    Raises:
      ValueError: for input that is not in-memory arrays, row counts that
        do not match `dataset_size`, a `batch_size` other than B, views
        that do not match `augmult`, a repeated example, a `validation_split`
        holding out a copy of a training row (`held_out.py`), a `class_weight`
        (`class_weights.py`), or a refused argument.
    """
    if steps_per_execution != 1:
        # Keras would pull whole executions of steps from the endless
        # Poisson stream: more steps than E * round(N / B), counted once.
        raise _validate.invalid(
            "steps_per_execution",
            "1 (in compile) for private training on the JAX backend",
            steps_per_execution,
        )
    # With its reason, before the refusals of what would batch for the model.
    class_weights.refuse_class_weight(kwargs.get("class_weight"))
    for name in ("steps_per_epoch", "sample_weight", "shuffle"):
        if kwargs.get(name) is not None:
            raise _validate.invalid(
                name, "None (the model draws its Poisson steps itself)", kwargs[name]
            )
    if batch_size is not None and batch_size != config.expected_batch_size:
        raise _validate.invalid(
            "batch_size",
            f"None or the model's expected_batch_size ({config.expected_batch_size})",
            batch_size,
        )
    if example_source.is_source(x, y):
        _check_source_promise(x, kwargs.get("repeated_rows"))
        return _checked_source(config, x, validation_split), None, validation_data
    leaves = tree.flatten((x, y))
    if y is None or not leaves or not all(isinstance(a, np.ndarray) for a in leaves):
        raise ValueError(
            "Invalid value for `x`/`y`: expected in-memory numpy arrays (or dicts or lists "
            "of them) with one row per example, or a random-access source as `x` "
            "(`len(source)` examples, `source[i]` -> (inputs, label)); on the JAX backend the "
            f"model draws its Poisson steps from them. Received: x={type(x).__name__}, "
            f"y={type(y).__name__}."
        )
    x, y = plain_arrays((x, y))
    validation_split = _validate.real(
        "validation_split", validation_split, low=0.0, high=1.0, high_inclusive=False
    )
    rows = len(leaves[0])
    if any(len(a) != rows for a in leaves):
        raise ValueError(
            f"Invalid value for `x`/`y`: every array needs the same number of rows. "
            f"Received: {sorted({len(a) for a in leaves})}."
        )
    if validation_split:
        if validation_data is not None:
            raise _validate.invalid(
                "validation_split", "0 when validation_data is given", validation_split
            )
        held = int(rows * validation_split)
        split = rows - held
        validation_data = tree.map_structure(lambda a: a[split:], (x, y))
        x, y = tree.map_structure(lambda a: a[:split], (x, y))
        rows = split
        # A record on both sides: its `val_` metrics would be a training statistic.
        held_out.refuse_split_copies(x, validation_data[0])
    _check_rows(config, rows, "training rows given to fit", " after any validation split")
    _check_views(config, x, axis=1, where="")
    _repeated_rows.check(x, y, kwargs.get("repeated_rows", _repeated_rows.REFUSE))
    return x, y, validation_data


def plain_arrays(arrays):
    """`arrays` (a structure of numpy arrays) as base-class arrays sharing their data.

    A subclass's own `__getitem__` (or its ufuncs) would build each Poisson
    step's rows, seeing all of them: a review's subclass blended the step's
    mean into every row (16.9 lr*C/B).
    """
    return tree.map_structure(np.asarray, arrays)


def _check_rows(config: DPConfig, rows: int, what: str, note: str = "") -> None:
    if rows != config.dataset_size:
        raise _validate.invalid(
            "dataset_size",
            f"the number of {what} ({rows}{',' if note else ''}{note}): q = B / N must "
            "describe the sampling",
            config.dataset_size,
        )


def _check_views(config: DPConfig, inputs, axis: int, where: str) -> None:
    """Every input holds K views on `axis` (1: arrays of examples; 0: one example)."""
    if config.augmult == 1:
        return
    bad = [
        a.shape for a in tree.flatten(inputs) if a.ndim <= axis or a.shape[axis] != config.augmult
    ]
    if bad:
        layout = "[N, K, ...]" if axis == 1 else "[K, ...] per example"
        raise ValueError(
            f"Invalid value for `x`: with augmult={config.augmult} every input needs the "
            f"shape {layout.replace('K', str(config.augmult))} (the views of each example). "
            f"Received: shapes {bad}{where}."
        )


def _check_source_promise(source, repeated_rows) -> None:
    """Refuses a source whose examples nobody checked, unless the caller vouches for them.

    `AugmentedImages` compares its rows when it is made (`repeated_rows`
    there). Any other source computes its examples in code the model cannot
    see: one that holds a person at several indices (an oversampling or
    concatenating wrapper: measured 4x the bound for a person held 4 times)
    or returns another example than the one asked for (a stream behind the
    index: examples 5-6 times in 25 steps each) breaks the sampling the
    accountant charges for. Its caller says each index is one person, and
    source[i] always example i, with repeated_rows="distinct_people".
    """
    # Exactly the package's class: a subclass's own __getitem__ is code the
    # model cannot see into, like any other source.
    if type(source) is image_views.AugmentedImages:
        _repeated_rows.refuse_for_input(
            repeated_rows,
            type(source).__name__,
            "Its examples are checked where it is made: AugmentedImages(..., repeated_rows=...).",
        )
        return
    if repeated_rows != _repeated_rows.DISTINCT_PEOPLE:
        raise _validate.invalid(
            "repeated_rows",
            f"{_repeated_rows.DISTINCT_PEOPLE!r} with a source of your own "
            f"({type(source).__name__}), declaring that each of its indices is a different "
            "person and that source[i] always returns example i (its augmentation aside)",
            repeated_rows,
            "The model draws each step's indices with probability q = B / N and the "
            "accountant charges one draw per person: a person held at several indices "
            "(oversampling, a concatenation with overlaps) or a source that returns other "
            "examples than those asked for is sampled otherwise, above the epsilon reported. "
            "tan_keras.data.image_views.AugmentedImages checks its rows itself",
        )


def _checked_source(config: DPConfig, source, validation_split):
    """A random-access source of training examples (`example_source`), checked."""
    if validation_split:
        raise _validate.invalid(
            "validation_split",
            "0 with a random-access source (give validation_data: held-out arrays)",
            validation_split,
        )
    _check_rows(config, len(source), "examples of the source given to fit")
    inputs, _ = example_source.first_example(source)
    _check_views(config, inputs, axis=0, where=" in source[0]")
    return source
