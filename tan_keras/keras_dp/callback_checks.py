"""Which callbacks and weight files a private `fit` accepts, on either backend.

A callback that decides from a noiseless training statistic (the training
loss, a compiled metric, the clipped fraction) when to stop, which learning
rate to use or which weights to keep makes the number and the size of the
noisy updates depend on single training examples: epsilon does not cover
that. A weight file in the legacy HDF5 format has no place for the privacy
ledger. Both are refused before training, by the TensorFlow route
(`fit_entry.py`, through `fit_inputs`) and the JAX route (`jax_dp/dp_model.py`).

Imports no TensorFlow: the JAX backend runs without it.
"""

from typing import Any, Iterable, Optional

import keras

from tan_keras import _validate

# Training logs that carry no private information beyond what epsilon covers:
# the accountant's values and the statistics released with noise.
PRIVATE_TRAINING_LOGS = frozenset(
    {"epsilon", "eta", "dp_steps", "dp_epochs", "unchecked_sampling", "noisy_clipped_fraction"}
)

_LEGACY_WEIGHT_SUFFIXES = (".h5", ".hdf5")


def check_weight_file(name: str, filepath: Any) -> None:
    """Refuses a legacy HDF5 path for a private model's weights.

    Keras 3 still writes and reads its old HDF5 format for such paths, and
    that format has no place for the privacy ledger: weights restored from
    it would look as if no update had been released.

    Args:
      name: The argument's name, for the message.
      filepath: The path given.

    Raises:
      ValueError: naming `name`, for a `.h5`/`.hdf5` path other than `.weights.h5`.
    """
    path = str(filepath)
    if path.endswith(_LEGACY_WEIGHT_SUFFIXES) and not path.endswith(".weights.h5"):
        raise _validate.invalid(
            name,
            "a .keras file (the model) or a .weights.h5 file (its weights)",
            path,
            "The legacy HDF5 format cannot hold the privacy ledger, so weights restored "
            "from it would lose the count of the updates they went through. To load public "
            "weights from a legacy file, load them into the Keras model before make_private",
        )


def check_callbacks(
    callbacks: Optional[Iterable[Any]], releases_training_metrics: bool = False
) -> None:
    """Refuses, before training, callbacks that would void the guarantee.

    Args:
      callbacks: The callbacks given to `fit` (None or an iterable).
      releases_training_metrics: Whether the train step logs noiseless
        statistics of the training examples (`release_train_metrics`).

    Raises:
      ValueError: for a `ModelCheckpoint` writing the legacy HDF5 format
        (weights without their ledger); for a callback that decides from a
        noiseless training statistic (`EarlyStopping`, `ReduceLROnPlateau`,
        `ModelCheckpoint(save_best_only=True)`, `TerminateOnNaN`, any callback
        with a `monitor`) when to stop, what learning rate to use or which weights
        to keep.
    """
    for callback in callbacks or ():
        monitor = _noiseless_monitor(callback) if releases_training_metrics else None
        if monitor is not None:
            raise _validate.invalid(
                f"{type(callback).__name__}(monitor=...)",
                "a held-out statistic (a `val_` metric, with validation_data or "
                f"validation_split) or one of {sorted(PRIVATE_TRAINING_LOGS)}",
                monitor,
                "The training statistics are computed without noise: deciding from them "
                "when to stop, which learning rate to use or which weights to keep makes "
                "the number and the size of the noisy updates depend on single training "
                "examples, which epsilon does not cover",
            )
        if isinstance(callback, keras.callbacks.ModelCheckpoint):
            check_weight_file("filepath", callback.filepath)


def _noiseless_monitor(callback) -> Optional[str]:
    """The noiseless training log `callback` decides from, or None."""
    if isinstance(callback, keras.callbacks.TerminateOnNaN):
        # It has no monitor but reads logs["loss"]: finite per-example losses
        # whose running mean overflows stopped a review's run after 6 of 16
        # updates (only with the crafted examples present).
        return "loss"
    monitor = getattr(callback, "monitor", None)
    if not isinstance(monitor, str):
        return None
    if isinstance(callback, keras.callbacks.ModelCheckpoint) and not (
        callback.save_best_only or getattr(callback, "initial_value_threshold", None) is not None
    ):
        return None  # saves every epoch: the monitor decides nothing
    if monitor.startswith("val_") or monitor in PRIVATE_TRAINING_LOGS:
        return None
    return monitor
