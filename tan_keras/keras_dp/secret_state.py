"""The DP state of a `DPKerasModel` that is no weight, as the model reads and moves it.

The noise key; the counters of the privacy ledger (`dp_steps`, `dp_epochs`,
the sampling position), moved forward only; the cap on the noisy updates;
and the logical step under way: each replica sums the clipped gradients (and,
with a noisy clipped fraction, the clipped count) of its rows over the
micro-batches of a logical step, in accumulators built at `compile` and
zeroed at the step's end and at each `fit`'s start (`dp_state.SecretState`
holds the variables).
"""

from typing import Optional

import tensorflow as tf

from tan_keras import _keras_internals, _validate
from tan_keras.keras_dp import dp_state, optimizer_state
from tan_keras.keras_dp import ledger as ledger_lib


class _SecretState:
    """The model's DP state that is no weight: its ledger counters, step cap and sums."""

    @property
    def noise_key(self) -> tf.Variable:
        """The secret noise key. Checkpoint it to resume; never publish it."""
        return self._secret.key

    @property
    def dp_steps(self) -> tf.Variable:
        """Noisy updates of this model's mechanism released so far (read it, never assign).

        Its count in the privacy ledger of these weights (`privacy_ledger`),
        shared with every private model of the same mechanism over them. It
        only moves forward: restoring weights, in this process or from any
        weight file, never rewinds it, so the accountant never under-reports
        and no noise is drawn twice.
        """
        return self._secret.dp_steps

    @property
    def sampling_position(self) -> tf.Variable:
        """The logical step a Poisson pipeline must deliver next (read it, never assign).

        The noisy updates of every mechanism of the weights' ledger so far: a
        second training phase with other settings continues from the first
        phase's position, so it never draws the same steps of a sampler
        again. `fit` resumes a `make_poisson_dataset` pipeline there itself;
        for a sampler it cannot see, call `sampler.resume_at(...)` with it.
        """
        return self._secret.position

    @property
    def privacy_ledger(self) -> ledger_lib.PrivacyLedger:
        """Every private release these weights went through (`ledger.PrivacyLedger`)."""
        return self._privacy_ledger.root()

    @property
    def dp_epochs(self) -> tf.Variable:
        """With sampling="shuffled": epochs in which an update was released."""
        return self._secret.dp_epochs

    def _advance_ledger(self, steps: int, epochs: int = 0) -> int:
        """Moves the ledger forward to `steps` (never back); returns its value."""
        for name, value in (("dp_steps", steps), ("dp_epochs", epochs)):
            counter = getattr(self._secret, name)
            counter.assign(max(int(counter.numpy()), _validate.integer(name, value, low=0)))
        self.privacy_ledger._sync_position()
        return int(self._secret.dp_steps.numpy())

    def _build_dp_state(self):
        variables = self.trainable_variables
        if not variables:
            raise ValueError("DPKerasModel has no trainable variables to train.")
        trained = [(id(v), tuple(v.shape)) for v in variables]
        with tf.init_scope(), self.distribute_strategy.scope():
            if self._secret.accumulators is None or trained != self._secret.trained:
                # First compile, or a re-compile after layers were frozen or
                # unfrozen: one accumulator per trainable variable. A partial
                # step is dropped (as by every fit); the ledger and the noise
                # key stay, so no update is forgotten and no noise reused.
                # One copy per replica: each sums the clipped gradients of its
                # own rows; the copies meet in the optimizer's all-reduce.
                self._secret.accumulators = [
                    tf.Variable(
                        tf.zeros_like(v),
                        trainable=False,
                        name="dp_accumulator",
                        synchronization=tf.VariableSynchronization.ON_READ,
                        aggregation=tf.VariableAggregation.SUM,
                    )
                    for v in variables
                ]
                self._secret.trained = trained
                self._secret.pending.assign(0)
            if self._dp_config.clipped_fraction_std is not None and (
                self._secret.clipped_count is None
            ):
                # Per replica, like the gradient accumulators: each counts
                # its own rows; the noisy partial counts are summed at release.
                self._secret.clipped_count = tf.Variable(
                    0.0,
                    trainable=False,
                    name="dp_clipped_count",
                    synchronization=tf.VariableSynchronization.ON_READ,
                    aggregation=tf.VariableAggregation.SUM,
                )
            # A weight that does not train is its own average: its shadow
            # follows its value (e.g. a frozen backbone loaded after
            # make_private), and the EMA of the others goes on.
            trainable = {id(v) for v in variables}
            for source, shadow in zip(self._ema_sources, self._ema_variables or []):
                if id(source) not in trainable:
                    shadow.assign(source)
            # Build optimizer slots now, so that the gated update can snapshot
            # and restore the complete optimizer state from the first step on.
            # (One built for other variables is refused: optimizer_state.py.)
            optimizer_state.check_built_for(self.optimizer, variables)
            optimizer_state.check_keeps_no_weight_average(self.optimizer)
            if _keras_internals.optimizer_built_for(self.optimizer) is None:
                self.optimizer.build(variables)

    def _reset_accumulators(self):
        for acc in self._secret_accumulators():
            if tf.distribute.in_cross_replica_context():
                dp_state.assign_zero(acc)
            else:
                acc.assign(tf.zeros_like(acc))
        self._secret.pending.assign(0)
        self._secret.violation.assign(tf.zeros_like(self._secret.violation))

    def _secret_accumulators(self):
        """The un-noised per-replica sums of the logical step: gradients, clipped count."""
        count = self._secret.clipped_count
        return list(self._secret.accumulators) + ([] if count is None else [count])

    def _accumulate(self, clipped):
        for acc, g in zip(self._secret.accumulators, clipped.grad_sum):
            acc.assign_add(g)
        if self._secret.clipped_count is not None:
            # Each example adds at most 1: the count's sensitivity.
            self._secret.clipped_count.assign_add(tf.cast(clipped.num_clipped, tf.float32))

    def _accumulated(self):
        return [acc.read_value() for acc in self._secret.accumulators]

    def _ends_logical_step(self, step_end):
        # Plain (x, y[, w]) batches are each a whole logical step. The Poisson
        # pipeline repeats the flag on every row so that it survives the
        # split of a global micro-batch across replicas.
        if step_end is None:
            return tf.constant(True)
        return tf.reduce_any(tf.cast(step_end, tf.bool))

    def _releases_update(self, step_end):
        # The step cap is enforced here, not only by callbacks: with
        # steps_per_execution > 1 Keras runs several batches between two
        # callback calls.
        limit = self._secret.step_limit
        return tf.logical_and(step_end, tf.logical_or(limit < 0, self.dp_steps < limit))

    def _close_logical_step(self, step_end):
        for acc in self._secret_accumulators():
            acc.assign(tf.where(step_end, tf.zeros_like(acc), acc))
        pending = self._secret.pending
        pending.assign(tf.where(step_end, tf.zeros_like(pending), pending + 1))

    def set_step_limit(self, steps: Optional[int]) -> None:
        """Caps the total number of noisy updates (None removes the cap).

        Enforced inside the compiled train step: once `dp_steps` reaches the
        cap, further logical steps are discarded without touching the
        weights, whatever Keras callbacks or `steps_per_execution` do. The
        `PrivacyAccountant` callback sets it from its budget.

        Args:
          steps: The cap, an integer >= 0, or None.

        Raises:
          ValueError: if `steps` is not None or an integer >= 0.
        """
        if steps is None:
            self._secret.step_limit.assign(-1)
        else:
            self._secret.step_limit.assign(_validate.integer("steps", steps, low=0))

    @property
    def step_limit(self) -> Optional[int]:
        """The cap on the total number of noisy updates (None: none), set by `set_step_limit`."""
        limit = int(self._secret.step_limit.numpy())
        return None if limit < 0 else limit

    def at_step_boundary(self) -> bool:
        """Whether no logical step is half-accumulated (safe to checkpoint)."""
        return int(self._secret.pending.numpy()) == 0
