"""The training rows of a JAX `fit`: registered, and kept out of its validation data.

`data_copies` recognises copies of training rows and statistics of them
only among the arrays registered with it (`register_rows`). The JAX `fit`
registers its training inputs before anything looks for copies of them
(`traced_loss.py`, the `provenance` checks), as the TensorFlow route does,
and refuses validation data holding training rows: `val_` metrics are taken
to be public (callbacks may decide from them), and computed on training
examples they are training statistics without noise.
"""

from typing import Any

import numpy as np
from keras import tree

from tan_keras import _validate
from tan_keras.mechanism import data_copies


def register(x: Any, from_source: bool) -> None:
    """Registers the training inputs of a fit with `data_copies`.

    Args:
      x: The training inputs: arrays (or a dict or list of them), or a
        random-access source (`example_source.py`).
      from_source: Whether `x` is a source: the arrays it holds with one row
        per example (its images, say) are registered, as far as they are
        reachable as its attributes; what it computes per example is not.
    """
    if not from_source:
        data_copies.register_rows(x)
        return
    rows = len(x)
    held = [
        value
        for value in getattr(x, "__dict__", {}).values()
        if isinstance(value, np.ndarray) and value.ndim >= 2 and len(value) == rows
    ]
    if held:
        data_copies.register_rows(held)


def refuse_in_validation(validation_data: Any) -> None:
    """Refuses validation arrays holding rows of the training data.

    Args:
      validation_data: `fit`'s (`(x, y)` or `(x, y, sample_weight)`), or None.

    Raises:
      ValueError: naming `validation_data`, when its inputs hold a
        registered training row.
    """
    if not isinstance(validation_data, (tuple, list)) or not validation_data:
        return
    leaves = tree.flatten(validation_data[0])
    if any(isinstance(a, np.ndarray) and data_copies.holds_training_rows(a) for a in leaves):
        raise _validate.invalid(
            "validation_data",
            "examples that are not training examples",
            "arrays holding rows of the training data",
            "Their `val_` metrics would be statistics of the training set without noise, and "
            "callbacks (EarlyStopping, ModelCheckpoint, ReduceLROnPlateau) would decide from "
            "them. Hold out validation examples (validation_split, or a split made before "
            "training)",
        )
