"""Weights a callback sets or copies during a JAX `fit`, and the ledger.

`fit` looks the weights up in the ledger's memory (`ledger.recall`) when it
starts, before Keras calls any callback. A callback can still set weights
afterwards (a warm start in `on_train_begin`: `set_weights` of another
privately trained model's values) or copy them between updates (the best
epoch's weights, kept as arrays). Two callbacks close both doors:

- `RememberUpdates`, right after the step counter: the values each epoch
  leaves (and, when a user callback has a batch hook, each update leaves)
  are remembered with the ledger before any user callback can copy them;
- `RecallSetWeights`, after every user callback and right before the cap
  guard: the weights whose values changed since the update or the last
  look are looked up before the next update uses them (when training and
  every epoch begin, and before every batch when a user callback has a
  batch hook), and each `PrivacyAccountant` of the fit sets its cap again
  from the merged counts (`ledger_changed`).

They reach the weights through `self.model`, which makes Keras attach the
JAX state to the variables first (mid-epoch, the variables hold nothing).
"""

import keras

from tan_keras.keras_dp import callback_checks
from tan_keras.keras_dp import ledger as ledger_lib
from tan_keras.keras_dp.callbacks import PrivacyAccountant

# The hooks through which a callback runs code between two updates.
_BATCH_HOOKS = ("on_train_batch_begin", "on_train_batch_end", "on_batch_begin", "on_batch_end")


def has_batch_hook(callback) -> bool:
    """Whether `callback` runs its own code between the updates of an epoch."""
    return callback_checks.overrides_any(callback, _BATCH_HOOKS)


class RecallSetWeights(keras.callbacks.Callback):
    """Looks up weights a callback set, before the next update (module docstring).

    Args:
      private_model: The private model.
      callbacks: The fit's callbacks (its `PrivacyAccountant`s are told of a merge).
      between_batches: Whether to look before every batch too.
    """

    def __init__(self, private_model, callbacks, between_batches: bool):
        super().__init__()
        self._private_model = private_model
        self._accountants = [c for c in callbacks if isinstance(c, PrivacyAccountant)]
        self._between_batches = between_batches
        # {id(variable): fingerprint} of the values last looked at or left by an update.
        self._seen = None

    def seen(self, found) -> None:
        """Records the fingerprints of the values an update left (`RememberUpdates`)."""
        self._seen = found

    def _look(self, everything: bool = False) -> None:
        model = self.model  # (attaches the JAX state to the variables)
        ledger = model.privacy_ledger
        entries = ledger.entries()
        since = None if everything or self._seen is None else self._seen
        self._seen = ledger_lib.recall(model, ledger, since=since)
        if ledger.entries() != entries:
            for accountant in self._accountants:
                accountant.ledger_changed()

    def on_train_begin(self, logs=None):
        self._look(everything=True)

    def on_epoch_begin(self, epoch, logs=None):
        self._look()

    def on_train_batch_begin(self, batch, logs=None):
        if self._between_batches:
            self._look()


class RememberUpdates(keras.callbacks.Callback):
    """Remembers the values the updates leave before a user callback can copy them.

    Args:
      private_model: The private model.
      before: The fingerprints of its weights when the fit started (values
        that did not change are not remembered: other models hold them too).
      recall: The fit's `RecallSetWeights` (told which values an update left).
      between_batches: Whether to remember after every update too.
    """

    def __init__(self, private_model, before, recall: RecallSetWeights, between_batches: bool):
        super().__init__()
        self._private_model = private_model
        self._before = before
        self._recall = recall
        self._between_batches = between_batches

    def _remember(self) -> None:
        model = self.model  # (attaches the JAX state to the variables)
        found = ledger_lib.fingerprints(model.weights)
        ledger_lib.remember(model.weights, model.privacy_ledger, unless=self._before, found=found)
        self._recall.seen(found)

    def on_train_batch_end(self, batch, logs=None):
        if self._between_batches:
            self._remember()

    def on_epoch_end(self, epoch, logs=None):
        self._remember()
