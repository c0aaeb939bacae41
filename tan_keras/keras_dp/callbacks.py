"""Keras callbacks for private training: online accounting and budget stop."""

from typing import Optional

import keras

from tan_keras import _validate
from tan_keras.privacy import releases, tan


class PrivacyAccountant(keras.callbacks.Callback):
    """Counts noisy updates, logs epsilon and eta, stops at the budget.

    The step count is the model's `dp_steps` (noisy optimizer updates actually
    applied, restored with the weights on resume), never Keras' batch or
    epoch counters: with gradient accumulation several batches make one step.
    Epsilon is that of the whole privacy ledger of the model's weights
    (`model.privacy_ledger`): this model's updates composed with every other
    private release they went through (an earlier training phase with other
    settings, a privately adapted normalization). Every number uses the
    model's `dp_config.accounted_noise_multiplier`: the noise multiplier, or
    with a released noisy clipped fraction the effective one that accounts
    the update and the count together.

    Logged at every epoch end (and every `log_every_steps` updates if set):
    `epsilon`, `eta`, `dp_steps`, and `unchecked_sampling: 1` when part of
    that epsilon rests on sampling nothing checked: a model with
    sampling="caller_poisson", or one whose ledger holds such updates (its
    weights, or a copy of them, were trained so before: `set_weights`, a
    file, a second `make_private`).
    Training stops BEFORE an update that would take epsilon above
    `target_epsilon`, and after `max_steps` updates.

    Args:
      delta: DP delta in (0, 1).
      target_epsilon: Optional budget; None never stops on epsilon.
      max_steps: Optional number of noisy updates after which to stop.
      log_every_steps: Optional period (in updates) of an extra printed line.
      accountant: "rdp" (default) or "pld".

    Raises:
      ValueError: on an invalid argument.
    """

    def __init__(
        self,
        delta: float,
        target_epsilon: Optional[float] = None,
        max_steps: Optional[int] = None,
        log_every_steps: Optional[int] = None,
        accountant: str = "rdp",
    ):
        super().__init__()
        self.delta = _validate.delta("delta", delta)
        self.target_epsilon = (
            None if target_epsilon is None else _validate.positive("target_epsilon", target_epsilon)
        )
        self.max_steps = (
            None if max_steps is None else _validate.positive_int("max_steps", max_steps)
        )
        self.log_every_steps = (
            None
            if log_every_steps is None
            else _validate.positive_int("log_every_steps", log_every_steps)
        )
        self.accountant = _validate.one_of("accountant", accountant, ("rdp", "pld"))
        self._step_limit = None
        self._last_logged = None
        self.history = []

    def unchecked_sampling(self) -> bool:
        """Whether the model's epsilon rests partly on sampling nothing checked.

        Returns:
          True for a model with sampling="caller_poisson", or one whose
          privacy ledger counts updates on caller-drawn micro-batches
          (`releases.unchecked_sampling`).
        """
        if self._dp().sampling == "caller_poisson":
            return True
        return releases.unchecked_sampling(self.model.privacy_ledger.entries())

    def _dp(self):
        config = getattr(self.model, "dp_config", None)
        if config is None:
            raise ValueError("PrivacyAccountant needs a DPKerasModel (a model with a `dp_config`).")
        return config

    def _entries(self, steps: Optional[int] = None, epochs: Optional[int] = None):
        """The ledger's entries, this model's with `steps`/`epochs` if given."""
        mechanism = self._dp().mechanism
        entries = []
        own = releases.LedgerEntry(mechanism, 0)
        for entry in self.model.privacy_ledger.entries():
            if entry.mechanism == mechanism:
                own = entry
            else:
                entries.append(entry)
        own = releases.LedgerEntry(
            mechanism,
            own.steps if steps is None else steps,
            own.epochs if epochs is None else epochs,
        )
        return entries, own

    def epsilon(self, steps: Optional[int] = None) -> float:
        """Epsilon of the model's ledger with `steps` updates of its own (default: its count).

        With sampling="shuffled" the epsilon depends on the epochs in which
        updates were released, not on the steps: `steps` is then ignored
        and the model's epoch count is used (see `shuffled_epsilon`).
        """
        config = self._dp()
        if config.sampling == "shuffled":
            return self.shuffled_epsilon()
        others, own = self._entries(steps=steps)
        return releases.composed_epsilon(others + [own], self.delta, self.accountant)

    def shuffled_epsilon(self, epochs: Optional[int] = None) -> float:
        """sampling="shuffled": epsilon (replace-one, no amplification) after `epochs`."""
        others, own = self._entries(epochs=epochs)
        return releases.composed_epsilon(others + [own], self.delta, self.accountant)

    def on_train_begin(self, logs=None):
        config = self._dp()
        if self.target_epsilon is not None and config.accounted_noise_multiplier == 0:
            raise ValueError(
                "Invalid value for `target_epsilon`: a budget cannot be met with "
                "noise_multiplier=0 (every update has infinite epsilon). Received: "
                f"target_epsilon={self.target_epsilon}"
            )
        self._step_limit = self._limit(config)
        # The model enforces the cap in its train step; stopping from the
        # callback only saves the compute of the discarded batches.
        self._cap_model()
        self._stop_if_done()

    def _cap_model(self) -> None:
        """Sets the model's cap to this accountant's, unless a lower one is set.

        Several accountants may watch one fit (the budget of
        `make_private_with_epsilon` beside a user's logging one): the
        lowest cap holds; one without a cap never lifts another's (review:
        the last accountant's None removed the budget's cap, 32 updates ran
        for 7).
        """
        current = self.model.step_limit
        if self._step_limit is not None and (current is None or self._step_limit < current):
            self.model.set_step_limit(self._step_limit)

    def _limit(self, config) -> Optional[int]:
        limits = []
        if self.max_steps is not None:
            limits.append(self.max_steps)
        if self.target_epsilon is not None and config.poisson:
            limits.append(self._max_steps_within_budget(config))
        return min(limits) if limits else None

    def ledger_changed(self, epoch_counted: bool = False) -> None:
        """Sets the cap again from the ledger's counts, after a history merged into it mid-fit.

        `fit` calls it when a weight set by a callback (a warm start from
        another private model) brought the ledger of the updates it went
        through (`ledger.recall`), before the next update: the cap set when
        training or the epoch began used the counts of before. The cap only
        goes down.

        Args:
          epoch_counted: With sampling="shuffled", whether an update of the
            current epoch was released already (the epoch is counted in
            `dp_epochs`); if not, the next update counts one more epoch.
        """
        config = self._dp()
        limits = [limit for limit in (self._step_limit, self._limit(config)) if limit is not None]
        steps = int(self.model.dp_steps.numpy())
        if config.sampling == "shuffled" and self.target_epsilon is not None:
            epochs = int(self.model.dp_epochs.numpy()) + (0 if epoch_counted else 1)
            if self.shuffled_epsilon(epochs) > self.target_epsilon:
                limits.append(steps)
        self._step_limit = min(limits) if limits else None
        self._cap_model()
        self._stop_if_done()

    def _max_steps_within_budget(self, config) -> int:
        others, own = self._entries()
        return releases.steps_within_budget(
            others, config.mechanism, own.steps, self.target_epsilon, self.delta, self.accountant
        )

    def _stop_if_done(self) -> bool:
        steps = int(self.model.dp_steps.numpy())
        if self._step_limit is not None and steps >= self._step_limit:
            self.model.stop_training = True
            return True
        return False

    def on_epoch_begin(self, epoch, logs=None):
        config = self._dp()
        if config.sampling != "shuffled" or self.target_epsilon is None:
            return
        # One more epoch would count one more mechanism: refuse to start it
        # (the cap also stops the train step from releasing any update).
        if self.shuffled_epsilon(int(self.model.dp_epochs.numpy()) + 1) > self.target_epsilon:
            steps = int(self.model.dp_steps.numpy())
            self._step_limit = steps if self._step_limit is None else min(self._step_limit, steps)
            self._cap_model()
            self.model.stop_training = True

    def on_train_batch_end(self, batch, logs=None):
        self._stop_if_done()
        if self.log_every_steps:
            steps = int(self.model.dp_steps.numpy())
            if steps != self._last_logged and steps % self.log_every_steps == 0:
                self._last_logged = steps
                unchecked = " unchecked_sampling=1" if self.unchecked_sampling() else ""
                print(f"\ndp_steps={steps} epsilon={self.epsilon(steps):.4f}{unchecked}")

    def on_train_end(self, logs=None):
        self.model.set_step_limit(None)

    def on_epoch_end(self, epoch, logs=None):
        config = self._dp()
        steps = int(self.model.dp_steps.numpy())
        eps = self.epsilon(steps)
        eta = tan.eta(config.accounted_noise_multiplier, config.sampling_rate, steps)
        record = {"dp_steps": steps, "epsilon": eps, "eta": eta}
        if self.unchecked_sampling():
            # The ledger's, not only this model's: weights trained on
            # caller-drawn batches and copied here keep the flag.
            record["unchecked_sampling"] = 1
        if config.sampling == "shuffled":
            # eta describes Poisson sampling only.
            record = {
                "dp_steps": steps,
                "dp_epochs": int(self.model.dp_epochs.numpy()),
                "epsilon": eps,
            }
        self.history.append(record)
        if logs is not None:
            logs.update(record)
        self._stop_if_done()

    @property
    def step_limit(self) -> Optional[int]:
        """The number of updates after which training stops (None: no limit)."""
        return self._step_limit
