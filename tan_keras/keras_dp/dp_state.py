"""The DP state of a `DPKerasModel` that is not a model weight.

`SecretState` holds the noise key, the un-noised accumulated sums and the
privacy ledger in plain TensorFlow variables that Keras's weight lists,
`model.save`, `set_weights` and `tf.train.Checkpoint(model=...)` do not see;
`StepMetrics` the DP step's own metrics; `EpochOpener` marks the passes of
sampling="shuffled".
"""

import keras
import tensorflow as tf


class StepMetrics:
    """DP step metrics, kept out of the model's weights (a plain object)."""

    def __init__(self):
        self.loss = keras.metrics.Mean(name="loss")
        self.clipped = keras.metrics.Mean(name="clipped_fraction")
        self.norm = keras.metrics.Mean(name="grad_norm")
        self.nonfinite = keras.metrics.Sum(name="nonfinite_examples")

    def all(self):
        return [self.loss, self.clipped, self.norm, self.nonfinite]


class SecretState:
    """Holds the DP state that is not a model weight.

    A plain (non-trackable) object, so Keras weight lists, `model.save`,
    `set_weights`/`load_weights` and `tf.train.Checkpoint(model=...)` do not
    see what it holds:
      * the noise key (whoever has it can regenerate and subtract the noise)
        and the un-noised accumulated sums of clipped gradients: secret;
      * the privacy ledger `dp_steps`, the number of noisy updates released
        so far: the accountant's step count and the noise stream's position.
        Restoring weights (EarlyStopping(restore_best_weights=True),
        load_weights, set_weights) must not rewind it: the reported epsilon
        would drop below what was spent, and the next updates would reuse
        noise already released. Only `DPCheckpoint` and `load_model` set it,
        and only forward (`DPKerasModel._advance_ledger`).
    """

    def __init__(self, key):
        self.key = tf.Variable(key, dtype=tf.int64, trainable=False, name="dp_noise_key")
        self.accumulators = None
        # (id, shape) of the variables the accumulators were built for.
        self.trained = None
        self.dp_steps = replicated_counter(0, "dp_steps")
        # sampling="shuffled": epochs in which an update was released (each
        # example takes part once per epoch), and whether the current
        # epoch has released one yet.
        self.dp_epochs = replicated_counter(0, "dp_epochs")
        self.epoch_open = replicated_counter(0, "dp_epoch_open")
        # Micro-batches accumulated since the last noisy update.
        self.pending = replicated_counter(0, "dp_pending")
        # Number of noisy updates after which no more are applied (-1: none).
        self.step_limit = replicated_counter(-1, "dp_limit")


def replicated_counter(value, name):
    """An int64 counter that every replica updates alike (first replica's value kept)."""
    return tf.Variable(
        value,
        dtype=tf.int64,
        trainable=False,
        name=name,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
    )


class EpochOpener(keras.callbacks.Callback):
    """sampling="shuffled": marks each Keras epoch (one pass) as not yet counted.

    The count itself moves in the train step, with the first update of the
    epoch, so an epoch interrupted after releasing an update is counted.
    """

    def __init__(self, epoch_open):
        super().__init__()
        self._epoch_open = epoch_open

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_open.assign(0)


def assign_zero(variable):
    """Zeroes a variable, each replica's copy of a per-replica one.

    A per-replica (sync-on-read) accumulator cannot be assigned as a whole
    outside a replica context.
    """
    for component in getattr(variable, "values", (variable,)):
        component.assign(tf.zeros_like(component))
