"""Counting a JAX private model's updates, and the caps on them.

Each train batch of the JAX model is one logical step: `StepCounter`, the
first callback of every fit, advances the ledger's count after it, so every
later callback sees the count of the update just applied. The caps of the
fit's `PrivacyAccountant`s (the budget of `make_private_with_epsilon`, or
the user's own) are set before the first step is drawn (Keras draws it when
fit starts, before the callbacks' `on_train_begin`), and the model's Poisson
steps end there: no update beyond a cap can exist.
"""

import keras

from tan_keras.jax_dp import weights_recall
from tan_keras.keras_dp.callbacks import PrivacyAccountant


class StepCounter(keras.callbacks.Callback):
    """Counts the noisy updates in the ledger: each train batch is one logical step."""

    def __init__(self, model):
        super().__init__()
        self._private_model = model

    def on_train_batch_end(self, batch, logs=None):
        self._private_model._counters().steps.assign_add(1)


class CapReached(Exception):
    """Raised right before a step that would pass the cap; the model's `fit` ends there."""


class CapGuard(keras.callbacks.Callback):
    """The last callback of every fit: no step runs once the count reaches the cap.

    Keras draws the first step before the callbacks' `on_train_begin`, where
    `BackupAndRestore` restores the weights and their ledger, and reads
    `stop_training` only after a step: the step drawn first could otherwise
    run with the restored count already at the cap. Checked right before
    each step, after every other callback's `on_train_batch_begin`.
    """

    def __init__(self, model):
        super().__init__()
        self._private_model = model

    def on_train_batch_begin(self, batch, logs=None):
        model = self._private_model
        if model.step_limit is not None and int(model.dp_steps) >= model.step_limit:
            raise CapReached()


def fit_callbacks(model, callbacks, before) -> list:
    """A fit's callbacks: the step counter, the memory, the user's, the accountant, the guards.

    Args:
      model: The private model.
      callbacks: The callbacks given to `fit` (None or a list).
      before: The fingerprints of the model's weights when the fit started.

    Returns:
      The list to give Keras's `fit`: with a `History` (the user's, or one
      added) that holds what trained also when the guard ends the fit.
    """
    users = list(callbacks or [])
    between_batches = any(weights_recall.has_batch_hook(c) for c in users)
    callbacks = list(users)
    budget = model.privacy_budget
    if budget is not None:
        # Always, beside any accountant of the user's: the lowest cap holds.
        callbacks.append(
            PrivacyAccountant(budget.delta, budget.target_epsilon, accountant=budget.accountant)
        )
    if not any(isinstance(c, keras.callbacks.History) for c in callbacks):
        callbacks.append(keras.callbacks.History())
    recall = weights_recall.RecallSetWeights(model, callbacks, between_batches)
    remember = weights_recall.RememberUpdates(model, before, recall, between_batches)
    return [StepCounter(model), remember] + callbacks + [recall, CapGuard(model)]


def history_of(callbacks) -> keras.callbacks.History:
    """The `History` among a fit's callbacks (`fit_callbacks` adds one)."""
    return next(c for c in callbacks if isinstance(c, keras.callbacks.History))


def cap_reached_before_training(model, callbacks, verbose) -> bool:
    """Sets the model's cap from the accountants among `callbacks`; whether it is reached.

    Args:
      model: The private model (its `set_step_limit` and `dp_steps`).
      callbacks: The fit's callbacks.
      verbose: `fit`'s verbose: anything but 0 prints why nothing trains.

    Returns:
      True when the weights' updates already reach the cap: the fit must
      draw no step (the cap is then removed again).
    """
    model.set_step_limit(None)
    for accountant in callbacks:
        if isinstance(accountant, PrivacyAccountant):
            accountant.set_model(model)
            accountant.on_train_begin()
    limit, steps = model.step_limit, int(model.dp_steps)
    if limit is None or steps < limit:
        return False
    if verbose != 0:
        print(
            f"No update: these weights' {steps} updates already reach the cap of {limit} "
            "(the privacy budget, or max_steps)."
        )
    model.set_step_limit(None)
    return True
