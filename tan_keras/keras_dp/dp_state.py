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

from tan_keras.keras_dp import callback_checks, fit_inputs, step_identity
from tan_keras.keras_dp import ledger as ledger_lib
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
        # The Poisson stream this fit reads (`StreamPin`, set before its
        # first step): every marked micro-batch must carry it
        # (step_identity.stream_allowed); 0 in `stream_pinned` while none is.
        self.stream_pinned = replicated_counter(0, "dp_stream_pinned")
        self.pinned_source = replicated_counter(0, "dp_pinned_source")
        # The pinned pipeline's nonce (`sampling.pipeline_nonce`): the seals
        # of a marked micro-batch are checked with it, so a twin pipeline
        # (same key, same data, same stream id) is refused. Each process of
        # a multi-worker run pins its own pipeline's (set outside the
        # replicas, so each keeps its own value).
        self.pinned_nonce = replicated_counter(0, "dp_pinned_nonce")
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


class StreamPin(keras.callbacks.Callback):
    """Pins the Poisson stream a fit reads, before its first step (`fit_inputs.stream_to_pin`).

    Runs at the start of training, after the callbacks that may restore a
    sampler's key (the stream id derives from it) and after Keras has
    built the input (a generator's pipelines exist once Keras has peeked
    at its first element), before any update.

    Args:
      secret: The model's `SecretState`.
      config: The model's DP configuration.
      data: `fit`'s `x`, as `fit` passes it on.

    Raises:
      ValueError: from `on_train_begin`, for a generator or `PyDataset`
        while several pipelines for the model's (N, B) are alive.
    """

    def __init__(self, secret, config, data):
        super().__init__()
        self._secret = secret
        self._config = config
        self._data = data

    def on_train_begin(self, logs=None):
        pin = fit_inputs.pin_of(self._config, self._data)
        stream, nonce = (0, 0) if pin is None else pin
        self._secret.stream_pinned.assign(0 if pin is None else 1)
        self._secret.pinned_source.assign(stream)
        self._secret.pinned_nonce.assign(nonce)


class WeightsRecall(keras.callbacks.Callback):
    """Recognises weights a callback wrote as arrays, before the next update uses them.

    A warm-start callback's `set_weights` (a copy of another privately
    trained model's weights) comes after `fit` looked the model's weights
    up: this callback, placed after every user callback, looks them up again
    (`ledger.recall`), so the ledger takes what those values went through
    before an update uses them:
      * always when training and the first epoch start (`on_train_begin`,
        `on_epoch_begin`);
      * with `between_epochs` (a user callback runs code at an epoch's end
        or beginning, or during validation) at every epoch's end and
        beginning too; with `between_batches` (a user callback has a batch
        hook) before every training batch too. Mid-fit only the weights
        whose values differ from those the last update left, or the last
        look found (`seen`), are looked up: a run that repeats another's
        seeds (an exact resume beside the uninterrupted run) produces that
        run's values itself and must not take its history.
    When a look merges a history into the ledger, each `PrivacyAccountant`
    of the fit sets its step cap again from the merged counts
    (`ledger_changed`), before the next update. When it moves the ledger's
    sampling position, a Poisson pipeline's sampler is resumed there if
    nothing was read yet (up to the first training batch); later the
    pipeline has drawn its next steps already, so the fit is stopped with a
    `ValueError` before any further update (sampling="poisson"; the ledger
    keeps the merged counts; none if no update follows, e.g. a copy at the
    last epoch's end).

    Args:
      model: The private model.
      sampler: The `PoissonSampler` of the pipeline `fit` reads, or None.
      accountants: The fit's `PrivacyAccountant` callbacks.
      between_epochs: Whether to look at every epoch's end and beginning.
      between_batches: Whether to look before every training batch too.
      epoch_open: sampling="shuffled": the variable saying whether the
        current epoch released an update (`SecretState.epoch_open`).
    """

    def __init__(
        self,
        model,
        sampler=None,
        accountants=(),
        between_epochs: bool = False,
        between_batches: bool = False,
        epoch_open=None,
    ):
        super().__init__()
        self._private = model
        self._sampler = sampler
        self._accountants = list(accountants)
        self._between_epochs = between_epochs or between_batches
        self._between_batches = between_batches
        self._epoch_open = epoch_open
        self._first_epoch = True
        # Whether the input pipeline may have been read (since the first
        # training batch).
        self._reading = False
        # The fingerprints of the layers' weights the last update left or the
        # last look found ({id(variable): fingerprint}).
        self._seen = None
        # The error that stops a Poisson fit whose position moved mid-fit.
        self._drawn_ahead = None

    @property
    def looks_mid_fit(self) -> bool:
        """Whether it looks the weights up between updates (needs `AfterUpdate`)."""
        return self._between_epochs

    def seen(self, found) -> None:
        """Records the fingerprints of the values an update left (`AfterUpdate`)."""
        self._seen = found

    def _recall(self):
        """Looks every weight up (training or the first epoch starts)."""
        self._merged(lambda ledger: ledger_lib.recall(self._private, ledger))

    def _look(self, where: str):
        """Looks up the weights changed since the last update or look (mid-fit)."""
        if self._seen is None:  # nothing looked at yet
            return
        since = self._seen
        self._merged(lambda ledger: ledger_lib.recall(self._private, ledger, since=since), where)

    def _merged(self, recall, where: str = ""):
        ledger = self._private.privacy_ledger
        entries = ledger.entries()
        position = int(self._private.sampling_position.numpy())
        self._seen = recall(ledger)
        if ledger.entries() == entries:
            return
        counted = self._epoch_open is not None and bool(self._epoch_open.numpy())
        for accountant in self._accountants:
            accountant.ledger_changed(epoch_counted=counted)
        after = int(self._private.sampling_position.numpy())
        if after == position or self._private.dp_config.sampling != "poisson":
            return
        if not self._reading:
            if self._sampler is not None:
                self._sampler.resume_at(after)
            return
        # Raised before the next update (`_stop_if_drawn_ahead`), none if the
        # fit ends first.
        self._drawn_ahead = ValueError(
            f"Invalid weights set by a callback {where}: they went through private "
            f"updates recorded in another privacy ledger, now merged into this "
            f"model's (`privacy_ledger`: {'; '.join(ledger.describe())}), which moves "
            f"the Poisson step it releases next from {position} to {after}. The input "
            f"pipeline has drawn its steps from {position} on already, and a step "
            "drawn for another position could repeat one those updates used. Set such "
            "weights before fit(), or in on_train_begin or the first epoch's "
            "on_epoch_begin (then the pipeline resumes at the merged position)."
        )

    def _stop_if_drawn_ahead(self):
        if self._drawn_ahead is not None:
            raise self._drawn_ahead

    def on_train_begin(self, logs=None):
        self._recall()

    def on_epoch_begin(self, epoch, logs=None):
        if self._first_epoch:
            self._first_epoch = False
            self._recall()
        elif self._between_epochs:
            self._look(f"in on_epoch_begin (epoch {epoch})")
            self._stop_if_drawn_ahead()

    def on_epoch_end(self, epoch, logs=None):
        # Before `WeightsMemory` remembers the epoch's values with this
        # ledger: values a callback brought take their own history first.
        if self._between_epochs:
            self._look(f"by the end of epoch {epoch}")

    def on_train_batch_begin(self, batch, logs=None):
        if self._between_batches:
            self._look(f"before training batch {batch}")
        if self._between_epochs:
            self._stop_if_drawn_ahead()
        # The train function reads the input from now on (creating the
        # iterator before the first batch reads nothing).
        self._reading = True


class AfterUpdate(keras.callbacks.Callback):
    """First callback of a fit whose callbacks run code between updates: the values an update left.

    Runs after each call of the train function (and at the start of
    validation and at an epoch's end), before any user callback, so that it
    sees the values the updates produced before a callback can copy or
    replace them:
      * with `every_batch` (a user callback has a batch hook) it remembers
        them after every update (`WeightsMemory.remember_now`): a snapshot a
        callback takes in `on_train_batch_end` is recognised;
      * it hands their fingerprints to `WeightsRecall`, whose next look
        looks up only the weights a callback changed since.

    Args:
      memory: The fit's `WeightsMemory`.
      recall: The fit's `WeightsRecall`.
      every_batch: Whether a user callback runs code between two batches.
    """

    def __init__(self, memory, recall, every_batch: bool):
        super().__init__()
        self._memory = memory
        self._recall = recall
        self._every_batch = every_batch
        self._updated = False

    def on_train_batch_end(self, batch, logs=None):
        if self._every_batch:
            self._recall.seen(self._memory.remember_now())
        else:
            # Fingerprinted once, when the epoch ends or validation starts.
            self._updated = True

    def _capture(self):
        if self._updated:
            self._updated = False
            self._recall.seen(ledger_lib.fingerprints(self._memory.variables()))

    def on_test_begin(self, logs=None):
        self._capture()

    def on_epoch_end(self, epoch, logs=None):
        self._capture()


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
# Hooks that run between the last update of an epoch and the first of the
# next (validation runs `on_test_*` at an epoch's end).
_EPOCH_HOOKS = (
    "on_epoch_begin",
    "on_epoch_end",
    "on_test_begin",
    "on_test_end",
    "on_test_batch_begin",
    "on_test_batch_end",
)


def _runs_code_in(callback, hooks) -> bool:
    kind = type(callback)
    if kind in _NO_WEIGHTS_MID_EPOCH or kind.__module__.split(".")[0] == "tan_keras":
        return False
    return callback_checks.overrides_any(callback, hooks)


def sees_weights_mid_epoch(callback) -> bool:
    """Whether `callback` runs code between two updates of an epoch that could copy the weights.

    Any callback with a batch hook (a `LambdaCallback` given one included),
    except Keras's own that read only logs or write files carrying the ledger
    (exactly those classes, not subclasses) and the package's own.
    """
    return _runs_code_in(callback, _BATCH_HOOKS)


def sees_weights_between_epochs(callback) -> bool:
    """Whether `callback` runs code between two epochs' updates that could set the weights.

    Any callback with an epoch hook or a validation (`on_test_*`) hook,
    except the same Keras classes and the package's own as
    `sees_weights_mid_epoch`.
    """
    return _runs_code_in(callback, _EPOCH_HOOKS)


class WeightsMemory(keras.callbacks.Callback):
    """Remembers the weight values a fit leaves, with their ledger (`ledger.remember`).

    Each weight this fit changed, the EMA shadows included, is fingerprinted
    with the ledger table of the moment, wherever code other than the
    package's can copy it: at every epoch's end (a callback may keep the best
    epoch's weights), at the end of the fit, and after every update when a
    callback runs code between updates (`sees_weights_mid_epoch`: a snapshot
    taken in `on_train_batch_end`; `AfterUpdate` calls `remember_now` before
    any user callback). A model that later holds one of those values takes
    that ledger.

    Args:
      model: The private model.
      before: The fingerprints of its layers' weights when the fit started.
    """

    def __init__(self, model, before):
        super().__init__()
        self._private = model
        self._before = before
        self._released = model.privacy_ledger.total_steps()

    def variables(self):
        """The model's weights, the EMA shadows included."""
        return self._private.weights

    def remember_now(self):
        """Remembers the current values if an update was released; returns their fingerprints."""
        variables = self.variables()
        found = ledger_lib.fingerprints(variables)
        ledger = self._private.privacy_ledger
        if ledger.total_steps() > self._released:
            ledger_lib.remember(variables, ledger, unless=self._before, found=found)
        return found

    def remember(self):
        ledger = self._private.privacy_ledger
        if ledger.total_steps() > self._released:
            ledger_lib.remember(self.variables(), ledger, unless=self._before)

    def on_epoch_end(self, epoch, logs=None):
        self.remember()


def assign_zero(variable):
    """Zeroes a variable, each replica's copy of a per-replica one.

    A per-replica (sync-on-read) accumulator cannot be assigned as a whole
    outside a replica context.
    """
    for component in getattr(variable, "values", (variable,)):
        component.assign(tf.zeros_like(component))
