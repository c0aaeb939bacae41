"""Which callbacks and weight files a private `fit` accepts, on either backend.

A callback that decides from a noiseless training statistic (the training
loss, a compiled metric, the clipped fraction) when to stop, which learning
rate to use or which weights to keep makes the number and the size of the
noisy updates depend on single training examples: epsilon does not cover
that. A weight file in the legacy HDF5 format has no place for the privacy
ledger. Both are refused before training, by the TensorFlow route
(`fit_entry.py`, through `fit_inputs`) and the JAX route (`jax_dp/dp_model.py`).

A compiled metric or loss logged under a name the logs give to something
else (`val_...`, which callbacks take to be held out; `epsilon` or another
key the package writes) would disguise a noiseless training statistic as a
public one: such names are refused at `compile` and again at `fit`, and a
monitor naming a compiled training metric is refused whatever its name.

Imports no TensorFlow: the JAX backend runs without it.
"""

from typing import Any, FrozenSet, Iterable, Optional, Set

import keras

from tan_keras import _keras_internals, _validate
from tan_keras.keras_dp import optimizer_state

# Training logs that carry no private information beyond what epsilon covers:
# the accountant's values and the statistics released with noise.
PRIVATE_TRAINING_LOGS = frozenset(
    {"epsilon", "eta", "dp_steps", "dp_epochs", "unchecked_sampling", "noisy_clipped_fraction"}
)

# Every key the package itself writes to the training logs: the above, and
# the noiseless statistics of the train steps (TensorFlow: dp_state.StepMetrics
# and train_step._NOTHING_RELEASED; JAX: train_logs.py), under their names.
PACKAGE_TRAINING_LOGS = PRIVATE_TRAINING_LOGS | frozenset(
    {"loss", "grad_norm", "clipped_fraction", "nonfinite_examples", "dp_nothing_released"}
)

# Keras logs what it computes on validation data under this prefix, and
# callbacks take such keys to be held out.
_HELD_OUT_PREFIX = "val_"

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


def check_compiled_names(model: Any) -> Set[str]:
    """Refuses compiled metrics and losses logged under a name that disguises them.

    Keras logs the metrics of `compile` under their names (`_keras_internals.
    compiled_log_names`). Computed by the train step on the training
    examples without noise, they must not pass for a held-out statistic
    (`val_...`, from which callbacks are allowed to decide) nor for a value
    the package writes (`epsilon`, `eta`, `dp_steps`, the noisy releases,
    its own statistics): `EarlyStopping(monitor="val_probe")` on a training
    metric named "val_probe" ran a number of updates that one example moved.

    Args:
      model: The private model, compiled (not compiled: nothing to check).

    Returns:
      The names its compiled metrics and losses may be logged under.

    Raises:
      ValueError: naming the `compile` argument, for a name starting with
        `val_` or one of `PACKAGE_TRAINING_LOGS`.
    """
    pairs = _keras_internals.compiled_log_names(model)
    for argument, name in pairs:
        if name.startswith(_HELD_OUT_PREFIX) or name in PACKAGE_TRAINING_LOGS:
            raise _validate.invalid(
                argument,
                "names, as Keras logs them, that neither start with "
                f"`{_HELD_OUT_PREFIX}` nor are one of "
                f"{sorted(PACKAGE_TRAINING_LOGS)}",
                f"one logged as {name!r}",
                "The train step computes the compiled metrics on the training examples "
                "without noise; under this name callbacks and readers of the logs would take "
                "the value for a held-out statistic or for one the package writes (epsilon, "
                "a noisy release). Rename the metric (name=...) or the output",
            )
    return {name for _, name in pairs}


def check_step_logs(keys: Iterable[str]) -> None:
    """Refuses a train step whose logs hold a key that passes for a noise-covered value.

    Called where the step is traced, before it runs: a `compute_metrics` (or
    `get_metrics_result`) of one's own decides its keys itself, which the
    names given to `compile` do not show.

    Args:
      keys: The keys of the train step's logs (with release_train_metrics,
        all of them noiseless but `noisy_clipped_fraction`).

    Raises:
      ValueError: naming the key, for one starting with `val_` or one the
        accountant writes (`epsilon`, `eta`, `dp_steps`...).
    """
    written_by_others = PRIVATE_TRAINING_LOGS - {"noisy_clipped_fraction"}
    for key in keys:
        if key.startswith(_HELD_OUT_PREFIX) or key in written_by_others:
            raise _validate.invalid(
                "metrics",
                "train step logs whose keys neither start with "
                f"`{_HELD_OUT_PREFIX}` nor are one of "
                f"{sorted(written_by_others)}",
                f"a key {key!r}",
                "The train step's logs are computed on the training examples without "
                "noise; under this key callbacks and readers of the logs would take the "
                "value for a held-out statistic or for the accountant's. Rename it",
            )


def overrides_any(callback: Any, hooks: Iterable[str]) -> bool:
    """Whether `callback` runs code of its own in any of `hooks` (Keras callback method names).

    Read from the instance, not its class: a `LambdaCallback` keeps the
    functions it is given as attributes of the instance.
    """
    for name in hooks:
        method = getattr(callback, name, None)
        if getattr(method, "__func__", method) is not getattr(keras.callbacks.Callback, name):
            return True
    return False


def check_fit(
    model: Any, callbacks: Optional[Iterable[Any]], releases_training_metrics: bool
) -> None:
    """The checks of a private `fit`'s metrics, callbacks and optimizer, before any update.

    The names again (a metric renamed or added since `compile`), then the
    callbacks, a monitor naming a compiled metric refused whatever its name,
    then the optimizer's own weight average (`use_ema`, set since `compile`:
    `SwapEMAWeights` would swap in values the ledger never saw).

    Args:
      model: The private model.
      callbacks: The callbacks given to `fit` (None or an iterable).
      releases_training_metrics: Whether the train step logs noiseless
        statistics of the training examples (`release_train_metrics`).

    Raises:
      ValueError: as `check_compiled_names`, `check_callbacks` and
        `optimizer_state.check_keeps_no_weight_average`.
    """
    names = check_compiled_names(model)
    check_callbacks(callbacks, releases_training_metrics, compiled_names=names)
    optimizer_state.check_keeps_no_weight_average(model.optimizer)


def check_callbacks(
    callbacks: Optional[Iterable[Any]],
    releases_training_metrics: bool = False,
    compiled_names: Iterable[str] = (),
) -> None:
    """Refuses, before training, callbacks that would void the guarantee.

    Args:
      callbacks: The callbacks given to `fit` (None or an iterable).
      releases_training_metrics: Whether the train step logs noiseless
        statistics of the training examples (`release_train_metrics`).
      compiled_names: The names the compiled metrics and losses are logged
        under in training (`check_compiled_names`): a monitor among them is
        a noiseless training statistic, whatever its name.

    Raises:
      ValueError: for a `ModelCheckpoint` writing the legacy HDF5 format
        (weights without their ledger); for a callback that decides from a
        noiseless training statistic (`EarlyStopping`, `ReduceLROnPlateau`,
        `ModelCheckpoint(save_best_only=True)`, `TerminateOnNaN`, any callback
        with a `monitor`) when to stop, what learning rate to use or which weights
        to keep.
    """
    compiled_names = frozenset(compiled_names)
    for callback in callbacks or ():
        monitor = (
            _noiseless_monitor(callback, compiled_names) if releases_training_metrics else None
        )
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


def _noiseless_monitor(callback, compiled_names: FrozenSet[str] = frozenset()) -> Optional[str]:
    """The noiseless training log `callback` decides from, or None.

    Decided by where the monitored key comes from: a compiled metric's name
    is a training statistic (the train step logs it), whatever it looks like;
    otherwise a `val_` key is Keras's held-out one, and the accountant's
    values and noisy releases are covered by epsilon.
    """
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
    if monitor in compiled_names:
        return monitor
    if monitor.startswith(_HELD_OUT_PREFIX) or monitor in PRIVATE_TRAINING_LOGS:
        return None
    return monitor
