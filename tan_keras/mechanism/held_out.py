"""Validation data must be held out: arrays holding training rows are refused.

`val_` metrics are taken to be public (callbacks such as EarlyStopping,
ModelCheckpoint and ReduceLROnPlateau decide from them, and they are shown
unnoised); computed on training examples they are training statistics
without noise (measured: `fit(x, y, validation_data=(x, y))` with
EarlyStopping on `val_loss` decided the number of updates from the
noiseless training loss). Training rows are recognised among the arrays
registered with `data_copies` by the `fit` of either backend; the rows
`validation_split` holds out are compared with the rows left for training
(`refuse_split_copies`), the same refusal for the same rows however given.
"""

from typing import Any

from keras import tree

from tan_keras import _repeated_rows, _validate
from tan_keras.mechanism import data_copies


def refuse_training_rows(validation_data: Any) -> None:
    """Refuses validation arrays holding rows of the training data.

    Args:
      validation_data: `fit`'s (`(x, y)` or `(x, y, sample_weight)`), or None;
        anything else (a pipeline) is not read.

    Raises:
      ValueError: naming `validation_data`, when its inputs hold a
        registered training row, or its records (all inputs of a row
        together) repeat training records (`data_copies.holds_training_records`).
    """
    if not isinstance(validation_data, (tuple, list)) or not validation_data:
        return
    leaves = tree.flatten(validation_data[0])
    if any(hasattr(a, "__array__") and data_copies.holds_training_rows(a) for a in leaves):
        raise _refusal("validation_data", "arrays holding rows of the training data")
    # Whole records, every input together: keras.io's dict of one-column
    # features (or one [N, 1] feature) holds no row of two numbers to match.
    copied = data_copies.holds_training_records(validation_data[0])
    if copied is not None:
        raise _refusal("validation_data", f"inputs of which {copied}")


def refuse_split_copies(training_inputs: Any, held_inputs: Any) -> None:
    """Refuses a `validation_split` whose held-out rows copy rows left for training.

    A record present twice in the arrays, once on each side of the split,
    makes `val_` metrics statistics of a training example, as the same rows
    passed as `validation_data` would (refused by `refuse_training_rows`).

    Args:
      training_inputs: The inputs of the rows trained on (an array, or a
        dict or list of arrays).
      held_inputs: The inputs of the rows held out, in the same structure.

    Raises:
      ValueError: naming `validation_split`, when a held-out row's inputs
        equal a training row's (all of them, exactly).
    """
    # Whole records, every input together: a dict of one-column features
    # (keras.io's structured data) repeats a record only across its columns.
    if _repeated_rows.shares_a_record(training_inputs, held_inputs):
        raise _refusal("validation_split", "a split whose held-out rows copy training rows")


def _refusal(name: str, received: str) -> ValueError:
    """The error for validation rows that are training rows, naming `name`."""
    return _validate.invalid(
        name,
        "examples that are not training examples",
        received,
        "Their `val_` metrics would be statistics of the training set without noise, and "
        "callbacks (EarlyStopping, ModelCheckpoint, ReduceLROnPlateau) would decide from "
        "them. Hold out validation examples (validation_split on rows without copies on "
        "both sides, or a split made before training)",
    )
