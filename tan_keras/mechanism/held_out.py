"""Validation data must be held out: arrays holding training rows are refused.

`val_` metrics are taken to be public (callbacks such as EarlyStopping,
ModelCheckpoint and ReduceLROnPlateau decide from them, and they are shown
unnoised); computed on training examples they are training statistics
without noise (measured: `fit(x, y, validation_data=(x, y))` with
EarlyStopping on `val_loss` decided the number of updates from the
noiseless training loss). Training rows are recognised among the arrays
registered with `data_copies` by the `fit` of either backend.
"""

from typing import Any

from keras import tree

from tan_keras import _validate
from tan_keras.mechanism import data_copies


def refuse_training_rows(validation_data: Any) -> None:
    """Refuses validation arrays holding rows of the training data.

    Args:
      validation_data: `fit`'s (`(x, y)` or `(x, y, sample_weight)`), or None;
        anything else (a pipeline) is not read.

    Raises:
      ValueError: naming `validation_data`, when its inputs hold a
        registered training row.
    """
    if not isinstance(validation_data, (tuple, list)) or not validation_data:
        return
    leaves = tree.flatten(validation_data[0])
    if any(hasattr(a, "__array__") and data_copies.holds_training_rows(a) for a in leaves):
        raise _validate.invalid(
            "validation_data",
            "examples that are not training examples",
            "arrays holding rows of the training data",
            "Their `val_` metrics would be statistics of the training set without noise, and "
            "callbacks (EarlyStopping, ModelCheckpoint, ReduceLROnPlateau) would decide from "
            "them. Hold out validation examples (validation_split, or a split made before "
            "training)",
        )
