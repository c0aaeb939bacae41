"""The noisy update of a `DPKerasModel` at a logical step's end, and its EMA.

Noise once per logical step on the accumulated clipped sum, divided by the
expected batch size, applied by the optimizer (gated under a distribution
strategy); the noisy clipped fraction released with it; the ledger advanced;
the EMA of the weights updated, and swapped in by `ema_weights`.
"""

import contextlib
import math

import tensorflow as tf

from tan_keras.keras_dp import ema
from tan_keras.mechanism import noise, per_example


class _NoisyUpdate:
    """The noisy update at a logical step's end, and the EMA of the weights."""

    def _noisy_update(self, grad_sum, apply):
        """Noises, normalizes and applies `grad_sum` where `apply` is True."""
        if tf.distribute.has_strategy():
            self._gated_noisy_update(grad_sum, apply)
            return

        # One device, no merge_call: a tf.cond skips the noise and the update
        # on micro-batches that end no logical step, and saves the gated
        # path's three extra passes over the weights on those that do.
        def update():
            variables = self.trainable_variables
            self.optimizer.apply_gradients(zip(self._noisy_gradients(grad_sum), variables))
            if self._ema_variables is not None:
                self._update_ema(variables, tf.constant(True))
            self._release_clipped_fraction(tf.constant(True))
            self._count_release(tf.constant(True))
            return tf.constant(True)

        tf.cond(apply, update, lambda: tf.constant(False))

    def _noisy_gradients(self, grad_sum):
        """The gradient the optimizer sees: (sum + noise) / B, plus weight penalties.

        Under a strategy with R replicas each adds independent noise of std
        sigma*C/sqrt(R) to its partial sum; the optimizer's all-reduce SUMs
        them, giving the global clipped sum plus noise of std sigma*C, once
        per logical step.
        """
        config = self._dp_config
        replica = tf.distribute.get_replica_context()
        stddev = config.noise_stddev / math.sqrt(replica.num_replicas_in_sync)
        seed = noise.step_seed(self._secret.key, self.dp_steps, replica.replica_id_in_sync_group)
        noisy_sum = noise.add_gaussian_noise(grad_sum, stddev, seed)
        grads = [g / config.expected_batch_size for g in noisy_sum]
        return self._add_weight_regularization(grads, self.trainable_variables)

    def _gated_noisy_update(self, grad_sum, apply):
        """`_noisy_update` under a distribution strategy.

        There is no tf.cond around the update: under MirroredStrategy the
        optimizer's all-reduce and every update of a mirrored variable go
        through `merge_call`, which control flow cannot contain. So the update
        runs on every micro-batch and only takes effect when `apply` (end of
        a logical step, within the step cap): otherwise the weights and the
        optimizer state are put back as they were and nothing else changes.
        """
        replica = tf.distribute.get_replica_context()
        variables = self.trainable_variables
        grads = [tf.where(apply, g, tf.zeros_like(g)) for g in self._noisy_gradients(grad_sum)]

        state = [per_example.tf_variable(v) for v in list(variables) + self._optimizer_variables()]
        saved = [tf.identity(v) for v in state]
        self.optimizer.apply_gradients(zip(grads, variables))

        def keep_update_if_applied(strategy, apply, saved):
            for var, old in zip(state, saved):
                strategy.extended.update(
                    var, lambda v, o, ok: v.assign(tf.where(ok, v, o)), args=(old, apply)
                )

        replica.merge_call(keep_update_if_applied, args=(apply, saved))
        if self._ema_variables is not None:
            self._update_ema(variables, apply)
        self._release_clipped_fraction(apply)
        self._count_release(apply)

    def _release_clipped_fraction(self, apply):
        """Releases the step's noisy clipped fraction into its tracker where `apply`.

        (count + N(0, sigma_b^2)) / B with sigma_b = clipped_fraction_std * B,
        once per logical step, with the noise of the step's own stream
        (`noise.clipped_count_seed`, read before the ledger moves). Under a
        strategy with R replicas each adds noise of std sigma_b / sqrt(R) to
        its partial count, and the noisy partials are summed across replicas
        here: every replica logs the same released value, so however Keras
        reduces the logs (mean, first replica) and the tracker (sum of
        totals over sum of counts), the logged value is the released one.
        """
        config = self._dp_config
        if config.clipped_fraction_std is None:
            return
        replica = tf.distribute.get_replica_context()
        replicas = replica.num_replicas_in_sync
        stddev = config.clipped_count_noise_std / math.sqrt(replicas)
        seed = noise.clipped_count_seed(
            self._secret.key, self.dp_steps, replica.replica_id_in_sync_group
        )
        (noisy_count,) = noise.add_gaussian_noise(
            [self._secret.clipped_count.read_value()], stddev, seed
        )
        if replicas > 1:
            noisy_count = replica.all_reduce(tf.distribute.ReduceOp.SUM, noisy_count)
        fraction = noisy_count / config.expected_batch_size
        # A step that is not released (not at its end, or past the step cap)
        # adds nothing: weight 0, and its value is never read.
        self._trackers.noisy_clipped.update_state(
            tf.where(apply, fraction, tf.zeros_like(fraction)),
            sample_weight=tf.cast(apply, tf.float32),
        )

    def _count_release(self, applied):
        """Advances the ledger by one released update where `applied`."""
        applied = tf.cast(applied, tf.int64)
        self.dp_steps.assign_add(applied)
        # Every mechanism's update moves the ledger's sampling position.
        self._secret.position.assign_add(applied)
        if self._dp_config.sampling == "shuffled":
            secret = self._secret
            secret.dp_epochs.assign_add(applied * (1 - secret.epoch_open))
            secret.epoch_open.assign(tf.maximum(secret.epoch_open, applied))

    def _optimizer_variables(self):
        return list(self.optimizer.variables)

    def _add_weight_regularization(self, grads, variables):
        # Weight regularizers do not depend on data, so their gradient needs no
        # clipping or noise; activity regularizers are refused at construction.
        if not self.losses:
            return grads
        with tf.GradientTape() as tape:
            penalty = tf.add_n(self.losses)
        reg = tape.gradient(
            penalty,
            [per_example.tf_variable(v) for v in variables],
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        # Each replica's gradient is SUMMED across replicas by the optimizer:
        # each adds 1/R of the penalty's gradient, so it counts exactly once.
        replicas = tf.distribute.get_replica_context().num_replicas_in_sync
        return [g + r / replicas for g, r in zip(grads, reg)]

    def _update_ema(self, variables, apply):
        ema.update(self._shadows_of(variables), variables, self._ema_decay, self.dp_steps, apply)

    def _shadows_of(self, variables):
        shadow = {id(v): s for v, s in zip(self._ema_sources, self._ema_variables)}
        return [shadow[id(v)] for v in variables]

    # --------------------------------------------------------------------- EMA
    @property
    def ema_variables(self):
        """EMA shadows of the trainable variables, in their order (None without `ema_decay`)."""
        if self._ema_variables is None:
            return None
        return self._shadows_of(self.trainable_variables)

    @contextlib.contextmanager
    def ema_weights(self):
        """Context manager: the model holds its EMA weights inside the block.

        Example: `with model.ema_weights(): model.evaluate(test_ds)`.

        Raises:
          ValueError: if the model has no EMA (`ema_decay` was None).
        """
        if self._ema_variables is None:
            raise ValueError(
                "This DPKerasModel keeps no EMA of its weights: pass ema_decay "
                "(e.g. 0.999) and compile the model."
            )
        # Only what trains has an average; a frozen weight is used as it is
        # (also when it was loaded after the last compile).
        variables = self.trainable_variables
        with ema.swapped_in(variables, self._shadows_of(variables)):
            yield self
