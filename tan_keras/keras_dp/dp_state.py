"""The DP state of a `DPKerasModel` that is not a model weight.

`SecretState` holds the noise key, the un-noised accumulated sums and the
privacy ledger in plain TensorFlow variables that Keras's weight lists,
`model.save`, `set_weights` and `tf.train.Checkpoint(model=...)` do not see;
`StepMetrics` the DP step's own metrics (noiseless training statistics,
which `release_train_metrics=False` removes, and the noisy clipped
fraction); `EpochOpener` marks the passes of sampling="shuffled".
"""

import keras
import tensorflow as tf

from tan_keras.keras_dp import ledger as ledger_lib
from tan_keras.keras_dp import step_identity
from tan_keras.keras_dp.ledger import replicated_counter


class StepMetrics:
    """DP step metrics, kept out of the model's weights (a plain object).

    Two kinds:
      * noiseless statistics of the private training examples: `loss`,
        `clipped` (clipped_fraction), `norm` (grad_norm), `nonfinite`
        (nonfinite_examples). They exist only with release_train_metrics
        (the default); without it they are None, so nothing can update,
        list or read them.
      * `noisy_clipped` (noisy_clipped_fraction): the mean over the steps
        released since the last reset of the privately released clipped
        fraction (DPConfig.clipped_fraction_std), or None when off.
    `eval_loss` is the loss of the test step (held-out data): the training
    loss tracker with release_train_metrics, a tracker of its own without.

    Args:
      release_train_metrics: Whether the noiseless training statistics exist.
      noisy_clipped_fraction: Whether a noisy clipped fraction is released.
    """

    def __init__(self, release_train_metrics: bool = True, noisy_clipped_fraction: bool = False):
        self.release_train_metrics = release_train_metrics
        if release_train_metrics:
            self.loss = keras.metrics.Mean(name="loss")
            self.clipped = keras.metrics.Mean(name="clipped_fraction")
            self.norm = keras.metrics.Mean(name="grad_norm")
            self.nonfinite = keras.metrics.Sum(name="nonfinite_examples")
            self.eval_loss = self.loss
        else:
            self.loss = self.clipped = self.norm = self.nonfinite = None
            self.eval_loss = keras.metrics.Mean(name="loss")
        self.noisy_clipped = (
            keras.metrics.Mean(name="noisy_clipped_fraction") if noisy_clipped_fraction else None
        )

    def leading(self):
        """The trackers Keras lists before the compiled metrics."""
        if self.release_train_metrics:
            return [self.loss, self.clipped, self.norm, self.nonfinite]
        return [self.eval_loss]

    def trailing(self):
        """The trackers Keras lists after the compiled metrics."""
        return [] if self.noisy_clipped is None else [self.noisy_clipped]


class SecretState:
    """Holds the DP state that is not a model weight.

    A plain (non-trackable) object, so Keras weight lists, `model.save`,
    `set_weights`/`load_weights` and `tf.train.Checkpoint(model=...)` do not
    see what it holds:
      * the noise key (whoever has it can regenerate and subtract the noise)
        and the un-noised accumulated sums of clipped gradients: secret;
      * the counters of the model's mechanism in its privacy ledger
        (`dp_steps`, `dp_epochs`: the accountant's count and the noise
        stream's position). They belong to the ledger, which belongs to the
        weights (`tan_keras.keras_dp.ledger`): it travels in weight files
        and only moves forward, whatever restores the weights.

    Args:
      key: The noise key (int64).
      counters: The ledger's counters of the model's mechanism (`steps`,
        `epochs`).
      position: The ledger's sampling position (the logical step a Poisson
        pipeline delivers next, over every mechanism).
    """

    def __init__(self, key, counters, position):
        self.key = tf.Variable(key, dtype=tf.int64, trainable=False, name="dp_noise_key")
        self.accumulators = None
        # (id, shape) of the variables the accumulators were built for.
        self.trained = None
        self.dp_steps = counters.steps
        # sampling="shuffled": epochs in which an update was released (each
        # example takes part once per epoch), and whether the current
        # epoch has released one yet.
        self.dp_epochs = counters.epochs
        self.position = position
        self.epoch_open = replicated_counter(0, "dp_epoch_open")
        # The first sampling identity violation of this fit (step_identity:
        # code, then the micro-batch's and the expected step and index; all 0
        # while none), and the stream id of the current step's micro-batches.
        self.violation = tf.Variable(
            tf.zeros([step_identity.RECORD_SIZE], tf.int64),
            trainable=False,
            name="dp_identity_violation",
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )
        self.step_source = replicated_counter(0, "dp_step_source")
        # With a released clipped fraction: the number of the logical step's
        # examples clipped so far (per replica, like `accumulators`;
        # un-noised, so secret). Built at compile.
        self.clipped_count = None
        # Micro-batches accumulated since the last noisy update.
        self.pending = replicated_counter(0, "dp_pending")
        # Number of noisy updates after which no more are applied (-1: none).
        self.step_limit = replicated_counter(-1, "dp_limit")


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


class SamplerResume(keras.callbacks.Callback):
    """Makes a Poisson pipeline's sampler draw the step the ledger releases next.

    Runs at the start of training, after the callbacks before it (one that
    restores weights, and the ledger with them, comes first) and before the
    input is first read.

    Args:
      sampler: The `PoissonSampler` of the pipeline `fit` reads.
      position: The ledger's sampling position (`PrivacyLedger.position`).
    """

    def __init__(self, sampler, position):
        super().__init__()
        self._sampler = sampler
        self._position = position

    def on_train_begin(self, logs=None):
        self._sampler.resume_at(int(self._position.numpy()))


class WeightsRecall(keras.callbacks.Callback):
    """Recognises weights a callback wrote as arrays when training or an epoch starts.

    A warm-start callback's `set_weights` in `on_train_begin` (or the first
    epoch's `on_epoch_begin`) comes after `fit` looked the model's weights
    up: this callback, after every user callback and before the first
    update, looks them up again (`ledger.recall`), so the ledger takes what
    those values went through. When that moves the ledger's sampling
    position, a Poisson pipeline's sampler is resumed there (nothing was
    read yet).

    Later epochs are not looked up: the pipeline has drawn ahead by then,
    and a run that repeats another's seeds (an exact resume beside the
    uninterrupted run) meets that run's values mid-fit and would take its
    history too.

    Args:
      model: The private model.
      sampler: The `PoissonSampler` of the pipeline `fit` reads, or None.
    """

    def __init__(self, model, sampler=None):
        super().__init__()
        self._private = model
        self._sampler = sampler
        self._first_epoch = True

    def _recall(self):
        ledger = self._private.privacy_ledger
        if self._sampler is None:
            ledger_lib.recall(self._private, ledger)
            return
        before = int(self._private.sampling_position.numpy())
        ledger_lib.recall(self._private, ledger)
        after = int(self._private.sampling_position.numpy())
        if after != before:
            self._sampler.resume_at(after)

    def on_train_begin(self, logs=None):
        self._recall()

    def on_epoch_begin(self, epoch, logs=None):
        if self._first_epoch:
            self._first_epoch = False
            self._recall()


# Keras callbacks that show no one the weights between two epochs: they read
# only logs, or write files that carry the ledger (ModelCheckpoint and
# BackupAndRestore with a save_freq in batches).
_NO_WEIGHTS_MID_EPOCH = (
    keras.callbacks.BackupAndRestore,
    keras.callbacks.CSVLogger,
    keras.callbacks.EarlyStopping,
    keras.callbacks.History,
    keras.callbacks.LearningRateScheduler,
    keras.callbacks.ModelCheckpoint,
    keras.callbacks.ProgbarLogger,
    keras.callbacks.ReduceLROnPlateau,
    keras.callbacks.RemoteMonitor,
    keras.callbacks.TensorBoard,
    keras.callbacks.TerminateOnNaN,
)
_BATCH_HOOKS = ("on_train_batch_begin", "on_train_batch_end", "on_batch_begin", "on_batch_end")


def sees_weights_mid_epoch(callback) -> bool:
    """Whether `callback` runs code between two updates of an epoch that could copy the weights.

    Any callback with a batch hook (a `LambdaCallback` given one included),
    except Keras's own that read only logs or write files carrying the ledger
    (exactly those classes, not subclasses) and the package's own.
    """
    kind = type(callback)
    if kind in _NO_WEIGHTS_MID_EPOCH or kind.__module__.split(".")[0] == "tan_keras":
        return False
    for name in _BATCH_HOOKS:
        method = getattr(callback, name, None)
        if getattr(method, "__func__", method) is not getattr(keras.callbacks.Callback, name):
            return True
    return False


class WeightsMemory(keras.callbacks.Callback):
    """Remembers the weight values a fit leaves, with their ledger (`ledger.remember`).

    Each weight this fit changed, the EMA shadows included, is fingerprinted
    with the ledger table of the moment, wherever code other than the
    package's can copy it: at every epoch's end (a callback may keep the best
    epoch's weights), at the end of the fit, and after every update when a
    callback runs code between updates (`sees_weights_mid_epoch`: a snapshot
    taken in `on_train_batch_end`). A model that later holds one of those
    values takes that ledger.

    Args:
      model: The private model.
      before: The fingerprints of its layers' weights when the fit started.
      every_batch: Whether to remember after every training batch too.
    """

    def __init__(self, model, before, every_batch: bool = False):
        super().__init__()
        self._private = model
        self._before = before
        self._every_batch = every_batch
        self._released = model.privacy_ledger.total_steps()

    def remember(self):
        ledger = self._private.privacy_ledger
        if ledger.total_steps() > self._released:
            ledger_lib.remember(self._private.weights, ledger, unless=self._before)

    def on_train_batch_end(self, batch, logs=None):
        if self._every_batch:
            self.remember()

    def on_epoch_end(self, epoch, logs=None):
        self.remember()


def assign_zero(variable):
    """Zeroes a variable, each replica's copy of a per-replica one.

    A per-replica (sync-on-read) accumulator cannot be assigned as a whole
    outside a replica context.
    """
    for component in getattr(variable, "values", (variable,)):
        component.assign(tf.zeros_like(component))
