"""`DPKerasModel`: a Keras model whose `fit` is DP-SGD as the TAN paper runs it.

One logical DP-SGD step (see docs/tan-method.md, section 1):

  g = ( sum_{i in batch} clip_C( mean_{k<K} grad l(w; view_k(x_i)) )
        + N(0, sigma^2 C^2 I) ) / B

The model only wires together pure functions that are tested on their own:
per-example gradients (`per_example.py`), clipping (`clipping.py`), noise
(`noise.py`). Batches come from `tan_keras.mechanism.sampling` (Poisson sampling, padded
to a static physical size, split into micro-batches). Each element is
`(x, y, mask, step_end)`: `mask` marks real rows (padding contributes exactly
nothing) and `step_end` marks the last micro-batch of a logical step, when the
accumulated clipped sum gets its noise -- once -- and the update is applied.
In-memory arrays are Poisson-sampled by the model (`array_inputs.py`); plain
`(x, y)` or `(x, y, sample_weight)` batches are each one logical step with
sampling="shuffled".
"""

import contextlib
import inspect
import math
import re
from typing import Optional, Sequence, Union

import keras
import numpy as np
import tensorflow as tf

from tan_keras import (
    _keras_internals,
    _stack,  # noqa: F401  (refuses another Keras or backend)
    _validate,
)
from tan_keras.keras_dp import (
    array_inputs,
    budget,
    dp_state,
    ema,
    example_weights,
    fit_inputs,
    id_inputs,
    labels,
    model_checks,
    output_losses,
    plain_training,
    precision,
    regime,
    row_prefix,
    step_identity,
)
from tan_keras.keras_dp import ledger as ledger_lib
from tan_keras.keras_dp.callbacks import PrivacyAccountant
from tan_keras.keras_dp.dp_config import MODEL_CONFIG_KEYS, DPConfig
from tan_keras.mechanism import (
    chunking,
    content_digest,
    data_copies,
    ghost,
    layerwise,
    model_analysis,
    noise,
    per_example,
    provenance,
    sampling,
)
from tan_keras.models import layer_rules  # noqa: F401  (the package's layers' rules)

CLIPPING_MODES = ("auto", "ghost", "layerwise", "vectorized")

# What the train step returns when it releases nothing (release_train_metrics
# =False without a noisy clipped fraction): Keras's train function cannot
# return an empty structure (its tf.experimental.Optional needs a tensor).
# A constant, so it carries nothing; `make_train_function` removes it.
_NOTHING_RELEASED = "dp_nothing_released"

# What Keras's Functional.get_config writes (the layer graph).
_FUNCTIONAL_CONFIG_KEYS = frozenset(
    {"name", "trainable", "layers", "input_layers", "output_layers"}
)


def _logs_for_strategy(logs):
    """The step's logs in the shape Keras can reduce across workers.

    Keras 3 averages each log over replicas with `strategy.reduce("MEAN", v,
    axis=0)` under a multi-worker strategy, which fails on a scalar; a
    one-element vector reduces to the same scalar.
    """
    if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
        return {name: tf.reshape(value, [1]) for name, value in logs.items()}
    return logs


def _is_float(variable) -> bool:
    return tf.as_dtype(variable.dtype).is_floating


def _label_spec(arguments):
    """Shape and dtype of a batch of labels in fit's/evaluate's data, or None.

    For several outputs, the same structure of specs as the labels.
    """
    data = arguments.get("x")
    if isinstance(data, (tf.data.Dataset, tf.distribute.DistributedDataset)):
        spec = data.element_spec
        if isinstance(spec, tuple) and len(spec) >= 2:
            leaves = tf.nest.flatten(spec[1])
            if leaves and all(hasattr(leaf, "shape") for leaf in leaves):
                return spec[1]
        return None
    labels = arguments.get("y")
    leaves = tf.nest.flatten(labels) if labels is not None else []
    if not leaves or not all(hasattr(t, "shape") and hasattr(t, "dtype") for t in leaves):
        return None
    return tf.nest.map_structure(
        lambda t: tf.TensorSpec(tuple(t.shape), tf.as_dtype(t.dtype)), labels
    )


# TensorFlow's message for an index outside a table (gather, embedding
# lookups, take): "indices[1,0,2] = 4242 is not in [0, 10)".
_OUT_OF_RANGE_VALUE = re.compile(r"= -?\d+ is not in \[")


def scrubbed_error(error: "tf.errors.InvalidArgumentError") -> Exception:
    """`error` from inside a train step, its values withheld.

    A runtime error of the compiled step is raised by the data of one
    micro-batch, and TensorFlow prints what it found there: an out-of-range
    id read by a custom layer ("indices[1,0,2] = 4242 is not in [0, 10)")
    names a private value and its row. Numbers and quoted strings are
    replaced, so the kind of failure and the op stay readable.
    """
    first_line = str(error.message).strip().splitlines()[0] if error.message else ""
    withheld = re.sub(r"\d+", "#", re.sub(r"(['\"]).*?\1", "'...'", first_line))
    return type(error)(
        None,
        None,
        f"A training step failed inside TensorFlow ({type(error).__name__}): {withheld} "
        "[values and positions withheld: they come from private training examples]. An id "
        "out of range of a table is the usual cause: Embedding and lookup layers drop such "
        "examples, a custom layer reading a table must check its ids itself.",
    )


@keras.saving.register_keras_serializable(package="tan_keras")
@_keras_internals.skip_first_batch_build
class DPKerasModel(keras.Model):
    """A `keras.Model` trained with DP-SGD.

    Build it like a functional model, `DPKerasModel(inputs, outputs, ...)`, or
    wrap an existing model with `make_private`. `compile`, `fit`, `evaluate`,
    `predict`, callbacks and `save`/`load_model` work as in Keras.

    Args:
      *args: Positional arguments of `keras.Model` (inputs, outputs).
      l2_norm_clip: C > 0, per-example clip norm (global over all variables).
      noise_multiplier: sigma >= 0; noise std on the sum is sigma * C.
      expected_batch_size: B, the expected Poisson batch size; the noisy sum is
        divided by it (a public constant), never by the realized size.
      dataset_size: N, the number of distinct training examples.
      augmult: K >= 1 views per example. With K > 1 training inputs are
        `[batch, K, *input_shape]`; the K views' gradients are averaged before
        clipping.
      ema_decay: Optional EMA decay d in [0, 1) of the weights, with warm-up
        d_t = min(d, (1 + t) / (10 + t)); see `ema_weights()`.
      noise_seed: None (default) seeds the noise from OS entropy. An integer
        makes the noise reproducible and the run NOT private against anyone who
        knows it (a `NotPrivateWarning` says so).
      clipping: How per-example gradients are computed (all give the same
        result): "vectorized" uses `tf.vectorized_map` over examples (any
        model); "ghost" does the same except for the Dense and Conv2D
        kernels and Embedding tables whose ghost norm is cheaper than their
        per-example gradients (few output positions, many weights; fewer ids
        per example than the vocabulary, see `tan_keras.mechanism.ghost`):
        those are clipped from their inputs and output gradients without
        forming per-example gradients (never a weight that another layer also
        uses: tied weights); "layerwise" contracts each layer's activations with
        its output gradients after one batched pass (Dense, Conv2D,
        WSConv2D, GroupNormalization, LayerNormalization), only for models
        whose every layer is known to keep examples apart, with no tied
        variables (`layerwise.unsupported_reason` says why not); "auto"
        (default) picks "layerwise" when the model is compiled with
        `jit_compile=True` (XLA, TPU) and layerwise supports it, else
        "ghost".
      examples_per_chunk: How many examples' per-example gradients are held
        in memory at once: the micro-batch is processed in chunks of this
        many examples, one after the other (same result, bounded memory).
        "auto" (default) picks chunks whose per-example gradients would fit
        in 256 MiB if all were formed (whatever the clipping mode, so that
        the chunk also bounds the activations); None processes the whole
        micro-batch at once; or an int >= 1.
      sampling: "poisson" (default): in-memory arrays passed to `fit`, or
        batches from `tan_keras.make_poisson_dataset`, Poisson-sampled and
        accounted with amplification by sampling; plain `(x, y)` batches
        are refused.
        "shuffled": `fit(x, y, batch_size=expected_batch_size)` on arrays,
        accounted without amplification (see `DPConfig.sampling` and
        `tan_keras.keras_dp.fit_inputs`).
      release_train_metrics: True (default): the train step returns, and
        Keras prints and logs, statistics computed WITHOUT noise on the
        private training examples: loss, the compiled metrics, grad_norm,
        clipped_fraction, nonfinite_examples. They are not covered by the
        privacy guarantee. False: none of them is computed into a metric or
        leaves the train step (`model.metrics` does not list them either);
        validation (`validation_data`, `evaluate`) works as usual, and
        `noisy_clipped_fraction` and the accountant's epsilon are still
        logged.
      clipped_fraction_std: None (default), or the std s > 0 of a privately
        released clipped fraction, logged as `noisy_clipped_fraction` (the
        mean over the epoch's released steps): once per logical step, the
        number of its examples whose gradient norm exceeded C, plus
        Gaussian noise of std s * B, divided by B (Andrew et al. 2021). The
        count is accounted with the update: epsilon uses
        `dp_config.accounted_noise_multiplier`. A few percent of std (e.g.
        0.05) cost little privacy when s * B is well above sigma. Refused
        with sampling="shuffled".
      **kwargs: Other `keras.Model` keyword arguments (name, ...).

    Raises:
      ValueError: on an invalid DP argument, "layerwise" for a model it would
        get wrong, float16 computation, or a layer that breaks per-example
        privacy (BatchNormalization, activity regularizers, any layer whose
        training call updates a variable), preprocessing state adapted on
        data that no mark vouches for (`provenance.py`), or a lookup layer
        with `num_oov_indices=0` (`id_inputs.py`).
    """

    # Set by `make_private_with_epsilon` (`budget.PrivacyBudget`): each fit
    # then gets a PrivacyAccountant that stops at the budget.
    privacy_budget = None

    def __init__(
        self,
        *args,
        l2_norm_clip: Optional[float] = None,
        noise_multiplier: Optional[float] = None,
        expected_batch_size: Optional[int] = None,
        dataset_size: Optional[int] = None,
        augmult: int = 1,
        ema_decay: Optional[float] = None,
        noise_seed: Optional[int] = None,
        clipping: str = "auto",
        examples_per_chunk: Union[int, str, None] = "auto",
        sampling: str = "poisson",
        release_train_metrics: bool = True,
        clipped_fraction_std: Optional[float] = None,
        **kwargs,
    ):
        # Validate before building anything: bad input must fail fast.
        required = dict(
            l2_norm_clip=l2_norm_clip,
            noise_multiplier=noise_multiplier,
            expected_batch_size=expected_batch_size,
            dataset_size=dataset_size,
        )
        missing = [name for name, value in required.items() if value is None]
        if missing:
            raise ValueError(
                f"DPKerasModel needs its DP settings; missing: {', '.join(missing)}. (Keras's "
                "clone_model rebuilds a functional model without them: to copy a private "
                "model, clone the wrapped Keras model and call tan_keras.make_private on the "
                "copy; its weights bring their privacy ledger.)"
            )
        config = DPConfig(
            l2_norm_clip=l2_norm_clip,
            noise_multiplier=noise_multiplier,
            expected_batch_size=expected_batch_size,
            dataset_size=dataset_size,
            augmult=augmult,
            sampling=sampling,
            clipped_fraction_std=clipped_fraction_std,
        )
        if not isinstance(release_train_metrics, (bool, np.bool_)):
            raise _validate.invalid("release_train_metrics", "True or False", release_train_metrics)
        release_train_metrics = bool(release_train_metrics)
        clipping = _validate.one_of("clipping", clipping, CLIPPING_MODES)
        examples_per_chunk = _validate.examples_per_chunk(examples_per_chunk)
        if ema_decay is not None:
            ema_decay = _validate.real(
                "ema_decay", ema_decay, low=0.0, high=1.0, high_inclusive=False
            )
        model_checks.check_no_custom_training_step(self, DPKerasModel)
        super().__init__(*args, **kwargs)
        # Preprocessing state adapted on data is refused unless vouched for
        # (provenance.py); a model being loaded gets its saved marks back first.
        provenance.apply_restored(self)
        provenance.check(self)
        self._check_held_values()
        # Set around Keras's attribute tracking: the two cut models share the
        # layers of this one and must not be tracked (or saved) as its own.
        object.__setattr__(self, "_row_prefix", row_prefix.split(self))
        # Out-of-range ids are dropped like invalid labels (id_inputs.py),
        # checked on the model the per-example routes run.
        id_inputs.check_lookups(self)
        numeric = self if self._row_prefix is None else self._row_prefix.suffix
        object.__setattr__(self, "_id_check", id_inputs.IdCheck.of(numeric))
        precision.check_precision(self)
        model_checks.check_model_is_dp_compatible(self)
        self._dp_config = config
        self._ema_decay = ema_decay
        reason = layerwise.unsupported_reason(self) if clipping == "layerwise" else None
        if reason is not None:
            raise ValueError(
                "Invalid value for `clipping`: expected 'auto', 'ghost' or 'vectorized' for this "
                f"model: {reason}. Use clipping='vectorized' (exact for any model: each "
                "example's views run through the model alone) or 'auto'. "
                "Received: clipping='layerwise'"
            )
        # "auto" is resolved in compile(), where jit_compile is known.
        self._clipping_requested = clipping
        self._clipping = "ghost" if clipping == "auto" else clipping
        # The kernels clipped by ghost norm; chosen in compile().
        self._ghost_layers = []
        self._examples_per_chunk = examples_per_chunk
        # The ledger of these weights: a model built over weights another
        # private model trains (a second make_private, a privately trained
        # base) shares that model's ledger (ledger.py).
        ledger = ledger_lib.ledger_of(self.weights) or ledger_lib.PrivacyLedger()
        object.__setattr__(self, "_privacy_ledger", ledger)
        counters = ledger.counters(config.mechanism, owner=self)
        self._secret = dp_state.SecretState(
            noise.make_noise_key(noise_seed), counters, ledger.position(owner=self)
        )
        # A seeded run is reproducible by choice (and warned not private):
        # a restored checkpoint keeps its key (checkpointing.py).
        object.__setattr__(self, "noise_seeded", noise_seed is not None)
        self._ema_variables = None
        self._ema_sources = []
        if ema_decay is not None:
            # One shadow per floating-point weight, frozen ones too, so that
            # a layer unfrozen before a re-compile has its shadow, and the
            # list saved with the model does not depend on what is trainable.
            # Created with the model (not at compile) so that save/load_model
            # restores them.
            self._ema_sources = [v for v in self.weights if _is_float(v)]
            self._ema_variables = [
                keras.Variable(
                    # A copy: a Keras variable built from a TensorFlow
                    # variable would share its storage.
                    tf.convert_to_tensor(v),
                    trainable=False,
                    name="ema_" + v.path.replace("/", "_"),
                    aggregation="only_first_replica",
                )
                for v in self._ema_sources
            ]
        ledger_lib.bind(ledger, self.weights)
        # The model's own files, and those of any model built from its layers
        # (a nested backbone saved on its own, a feature extractor cut from
        # it), carry the ledger.
        for layer in [self] + _keras_internals.all_layers(self):
            if layer is self or isinstance(layer, keras.Model) or layer.weights:
                ledger_lib.attach(layer, ledger)
        # Weights copied as arrays from a privately trained model.
        ledger_lib.recall(self, ledger)
        self._release_train_metrics = release_train_metrics
        self._trackers = dp_state.StepMetrics(
            release_train_metrics, noisy_clipped_fraction=config.clipped_fraction_std is not None
        )
        # fit's class_weight, as a lookup vector (example_weights.py).
        self._class_table = None
        # Shape of a batch of labels, for building the compiled metrics.
        self._label_spec = None

    # ------------------------------------------------------------------ config
    @property
    def dp_config(self) -> DPConfig:
        """The validated DP hyper-parameters (`DPConfig`)."""
        return self._dp_config

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

    @property
    def clipping(self) -> str:
        """The per-example gradient method in use: "ghost", "layerwise" or "vectorized"."""
        return self._clipping

    @property
    def ema_decay(self) -> Optional[float]:
        return self._ema_decay

    @property
    def release_train_metrics(self) -> bool:
        """Whether noiseless statistics of the training examples leave the train step."""
        return self._release_train_metrics

    def get_config(self):
        # Functional.get_config: the layer graph.
        config = super().get_config()
        dp = self._dp_config.to_dict()
        dp["ema_decay"] = self._ema_decay
        dp["clipping"] = self._clipping_requested
        dp["examples_per_chunk"] = self._examples_per_chunk
        dp["release_train_metrics"] = self._release_train_metrics
        marks = provenance.to_config(self)
        if marks:
            dp[provenance.CONFIG_KEY] = marks
        config.update(dp)
        config.update(budget.to_config(self.privacy_budget))
        # The ledger is not part of the config: it travels with the weights
        # (ledger.py), so a model rebuilt from its config alone, with fresh
        # weights, starts at 0.
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        dp_kwargs = {key: config.pop(key) for key in MODEL_CONFIG_KEYS if key in config}
        marks = config.pop(provenance.CONFIG_KEY, None)
        spent = config.pop("dp_steps", 0)
        epochs = config.pop("dp_epochs", 0)
        saved_budget = config.pop(budget.CONFIG_KEY, None)
        unknown = sorted(set(config) - _FUNCTIONAL_CONFIG_KEYS)
        if unknown:
            raise ValueError(
                f"Invalid DPKerasModel config: unknown keys {unknown}. Expected the keys "
                "that DPKerasModel.get_config writes."
            )
        # Keras rebuilds the layer graph and calls cls(inputs, outputs, name,
        # trainable, **dp_kwargs). A reloaded model draws fresh noise from OS
        # entropy: seeds are never saved. The ledger comes with the weights;
        # files written before it kept the count in the config.
        with provenance.restoring(marks):
            model = super().from_config({**config, **dp_kwargs}, custom_objects=custom_objects)
        model._advance_ledger(spent, epochs)
        budget.restore(model, saved_budget)
        return model

    # ----------------------------------------------------------------- compile
    def compile(self, optimizer="rmsprop", loss=None, metrics=None, **kwargs):
        """Like `keras.Model.compile`; the loss is evaluated per example.

        `loss` is a Keras loss name, function or `keras.losses.Loss`; for a
        model with several outputs, one loss for all of them, a list with one
        per output or a dict keyed by output name, with `loss_weights` alike
        (`output_losses.py`). Each example's loss is the weighted sum over
        outputs of their unreduced losses averaged over the K views; its
        gradient is clipped.

        Raises:
          ValueError: if `loss` is missing, or `loss`/`loss_weights` do not
            match the outputs; an optimizer option that would void DP (see
            `_check_optimizer`).
        """
        # Resolved before Keras compiles anything: bad input fails fast.
        resolved = output_losses.resolve(self, loss, kwargs.get("loss_weights"))
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)
        precision.check_optimizer(self.optimizer)
        self._check_optimizer_clipping()
        regime.warn_if_known_poor(self, self.optimizer, self._dp_config.noise_multiplier)
        if self._clipping_requested == "auto":
            # Measured on CPU (benchmarks/): without XLA, tf.vectorized_map with
            # ghost norms is the fastest (small CNN 1.5x, WRN-16-4 1.3x
            # faster than layerwise at batch 64); with XLA its while-loop
            # fallback compiles badly and layerwise is 2x faster.
            # layerwise.supports also rules out tied variables and models that
            # mix examples in one batched pass (ghost is exact for both).
            use_layerwise = (
                bool(self.jit_compile)
                and not model_checks.vectorizing_crashes(self)
                and layerwise.supports(self, self._dp_config.augmult)
            )
            self._clipping = "layerwise" if use_layerwise else "ghost"
        self._ghost_layers = (
            ghost.select_layers(self, self._dp_config.augmult) if self._clipping == "ghost" else []
        )
        self._output_losses = resolved
        self._per_example_loss = resolved.per_example_loss
        self._loss_keeps_no_state = False
        # Known once the model is traced (the row prefix cut included).
        self._one_at_a_time = model_checks.vectorizing_crashes(self)
        self._build_dp_state()

    def _check_held_values(self):
        # What the traced computation holds, whatever reference led there: a
        # copy of training rows or of adapted statistics is refused; a value
        # private training or a private release left brings its ledger
        # (`ledger.recall` reads the fingerprints).
        values = model_analysis.held_values(self)
        provenance.discover_adapted()
        data_copies.check_values(values, f"The model `{self.name}`")
        object.__setattr__(
            self, ledger_lib.HELD_VALUES_ATTRIBUTE, data_copies.value_fingerprints(values)
        )

    def _check_optimizer_clipping(self):
        # Keras applies clipnorm / global_clipnorm / clipvalue to each
        # replica's partial gradient before the all-reduce. Each partial sum
        # carries noise of std sigma*C/sqrt(R) only, and a nonlinear function
        # of the partials is not post-processing of the noisy total: with
        # R > 1 the accounted sigma would not hold.
        replicas = self.distribute_strategy.num_replicas_in_sync
        options = {
            name: getattr(self.optimizer, name, None)
            for name in ("clipnorm", "global_clipnorm", "clipvalue")
        }
        given = {name: value for name, value in options.items() if value is not None}
        if given and replicas > 1:
            name, value = next(iter(given.items()))
            raise ValueError(
                f"Invalid value for `{name}`: expected None with {replicas} replicas. "
                f"Received: {name}={value}. Keras clips each replica's partial gradient "
                "before summing them, and each partial carries only 1/sqrt(replicas) of "
                "the noise, so the accounted noise multiplier would not hold. Per-example "
                "clipping is l2_norm_clip; drop the optimizer's clipping (on one device it "
                "is allowed: it then acts on the whole noisy gradient)."
            )

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
            built_for = _keras_internals.optimizer_built_for(self.optimizer)
            if built_for is None:
                self.optimizer.build(variables)
            elif [id(v) for v in built_for] != [id(v) for v in variables]:
                raise ValueError(
                    "Invalid value for `optimizer`: expected a new optimizer (or a name "
                    "such as 'sgd') when the trainable variables changed since it was "
                    f"built ({len(built_for)} variables then, {len(variables)} now): a "
                    "built optimizer keeps state for the variables it was built for. "
                    f"Received: optimizer={self.optimizer!r} (already built)"
                )

    def add_loss(self, loss):
        """Refused: a loss term beside the per-example loss is not clipped.

        Raises:
          ValueError: always, saying what to use instead.
        """
        raise ValueError(
            "DPKerasModel.add_loss is not supported: DP-SGD clips each example's "
            "gradient of the loss given to compile(), and a term added to the model "
            "would escape that bound. Put a per-example term into the loss function, "
            "and a data-independent penalty into a weight regularizer "
            "(kernel_regularizer=...), which the model applies exactly."
        )

    def compile_from_config(self, config):
        """Recompiles a loaded model from its saved compile config."""
        self.compile(**keras.saving.deserialize_keras_object(config))

    @property
    def metrics(self):
        compiled = _keras_internals.compiled_metrics(self)
        if not self._release_train_metrics:
            # The train step never updates them; the test step builds them
            # on held-out data. Unbuilt, their result() would raise where
            # Keras reads every metric at an epoch's end.
            compiled = [metric for metric in compiled if metric.built]
        return self._trackers.leading() + compiled + self._trackers.trailing()

    def _dp_build_for_fit(self):
        # Called by Keras under a strategy instead of reading a batch (see
        # _keras_internals.skip_first_batch_build): everything else was built
        # at compile; the compiled metrics need the labels' shape.
        if self._label_spec is not None:
            _keras_internals.build_compiled_metrics(self, self._label_spec)

    # --------------------------------------------------------------------- fit
    def fit(self, *args, **kwargs):
        """`keras.Model.fit`, guarded against inputs that would void DP.

        In-memory data (`fit(x, y, batch_size=B, epochs=E,
        validation_split=...)`, arrays or dicts/lists of them) is
        Poisson-sampled by the model itself (`array_inputs.py`): about N / B
        noisy updates per epoch. A `tf.data` pipeline must come from
        `tan_keras.make_poisson_dataset` (endless by default: pass
        `steps_per_epoch`, counted in micro-batches).
        `sample_weight` and `class_weight` weigh each example's loss before
        its gradient is clipped (`example_weights.py`): clipping still bounds
        every example's contribution by C; a weight of 0 leaves the example
        out, a negative one is refused.

        Raises:
          ValueError: for a finite dataset of unknown length with several
            epochs (Keras would cut logical steps at epoch boundaries), a
            model that was not compiled, or a preprocessing layer adapted on
            data since the model was built (`provenance.py`).
        """
        bound = inspect.signature(keras.Model.fit).bind(self, *args, **kwargs)
        arguments = {**bound.arguments, **bound.arguments.get("kwargs", {})}
        arguments.pop("self", None)
        arguments.pop("kwargs", None)
        if fit_inputs.is_array(arguments.get("x")):
            # Before the checks that look for copies of them (data_copies.py).
            data_copies.register_rows(arguments["x"])
        _refuse_training_rows_in_validation(arguments.get("validation_data"))
        provenance.check(self, getattr(self, "loss", None))
        self._check_held_values()
        if self._dp_config.sampling == "poisson" and fit_inputs.is_array(arguments.get("x")):
            # The model draws the Poisson batches of in-memory data itself.
            arguments = array_inputs.poisson_arguments(self._dp_config, arguments)
        # Before `prepare` wraps it: what was applied to the Poisson pipeline.
        sampler = self._poisson_sampler(arguments.get("x"))
        arguments = fit_inputs.prepare(self._dp_config, arguments)
        class_weight = arguments.pop("class_weight", None)
        if class_weight is not None and len(self.outputs) > 1:
            raise _validate.invalid(
                "class_weight",
                "None for a model with several outputs (as in Keras: the class of an "
                "example is not defined); weigh examples with sample_weight",
                class_weight,
            )
        class_table = example_weights.class_weight_table(class_weight)
        if not example_weights.same_table(class_table, self._class_table):
            # The traced step holds the table as a constant: trace it again.
            self._class_table = class_table
            self.train_function = None
        data = arguments.get("x")
        epochs = arguments.get("epochs", 1) - arguments.get("initial_epoch", 0)
        if (
            isinstance(data, tf.data.Dataset)
            and arguments.get("steps_per_epoch") is None
            and epochs > 1
            and data.cardinality() == tf.data.UNKNOWN_CARDINALITY
        ):
            raise ValueError(
                "Invalid value for `steps_per_epoch`: expected an integer when fitting "
                "several epochs on a dataset of unknown length (a Poisson pipeline: "
                "its number of micro-batches is random). Received: steps_per_epoch=None. "
                "Keras would stop each epoch after the first epoch's count and cut "
                "logical steps in two. Use an endless make_poisson_dataset(steps=None) "
                "with steps_per_epoch, or epochs=1."
            )
        if self._secret.accumulators is None:
            raise ValueError("Compile the DPKerasModel before calling fit.")
        # Again here: an option set on the optimizer after compile.
        self._check_optimizer_clipping()
        self._label_spec = _label_spec(arguments)
        if not fit_inputs.is_array(data) and "shuffle" not in arguments:
            # Datasets and generators are never shuffled by Keras; its
            # default shuffle=True only draws a warning for them.
            arguments["shuffle"] = False
        # A partial logical step left by an earlier fit holds examples sampled
        # for THAT step; merging it into a new step could include an example
        # twice in one noisy update (sensitivity 2C). Drop it.
        self._reset_accumulators()
        callbacks = list(arguments.get("callbacks") or [])
        fit_inputs.check_callbacks(callbacks, self._release_train_metrics)
        spend = self.privacy_budget
        if spend is not None:
            # Always, beside any accountant of the user's (one that only logs
            # epsilon removed the budget: review); the lowest cap holds.
            callbacks.append(
                PrivacyAccountant(spend.delta, spend.target_epsilon, accountant=spend.accountant)
            )
        if self._dp_config.sampling == "shuffled":
            callbacks = [dp_state.EpochOpener(self._secret.epoch_open)] + callbacks
        # After the callbacks that may set weights as arrays (a warm start),
        # before the next update and the sampler's resume: they bring what
        # those values went through. Mid-fit only where a user callback runs
        # code between updates (none: no cost).
        # A generator's code runs between updates too: it can snapshot the
        # weights there (review round 8, escape 18).
        input_code = fit_inputs.runs_code_between_updates(arguments.get("x"))
        between_batches = input_code or any(dp_state.sees_weights_mid_epoch(c) for c in callbacks)
        recall = dp_state.WeightsRecall(
            self,
            sampler,
            accountants=[c for c in callbacks if isinstance(c, PrivacyAccountant)],
            between_epochs=input_code
            or any(dp_state.sees_weights_between_epochs(c) for c in callbacks),
            between_batches=between_batches,
            epoch_open=self._secret.epoch_open if self._dp_config.sampling == "shuffled" else None,
        )
        callbacks.append(recall)
        if sampler is not None:
            # Last, after any callback that restores weights and the ledger
            # with them (BackupAndRestore), before the input is first read.
            callbacks.append(dp_state.SamplerResume(sampler, self._secret.position))
        if self._dp_config.sampling == "poisson":
            # The stream the identity check holds every micro-batch to.
            callbacks.append(dp_state.StreamPin(self._secret, self._dp_config, arguments.get("x")))
        arguments["callbacks"] = callbacks
        # Weights set as arrays since construction (set_weights from a
        # privately trained model) bring what they went through; what this
        # fit changes is remembered wherever a copy could be taken.
        memory = dp_state.WeightsMemory(self, ledger_lib.recall(self, self.privacy_ledger))
        arguments["callbacks"] = arguments["callbacks"] + [memory]
        if recall.looks_mid_fit:
            # First: sees each update's values before any user callback.
            after_update = dp_state.AfterUpdate(memory, recall, every_batch=between_batches)
            arguments["callbacks"] = [after_update] + arguments["callbacks"]
        try:
            return super().fit(**arguments)
        finally:
            memory.remember()
            # TensorFlow keeps what Keras read a generator through: let go of
            # the generator (and the pipelines it holds) once fit is over.
            fit_inputs.detach(arguments.get("x"))

    def save(self, filepath, *args, **kwargs):
        """`keras.Model.save`, refusing the legacy HDF5 format (it cannot hold the ledger).

        Raises:
          ValueError: for a `.h5`/`.hdf5` path.
        """
        fit_inputs.check_weight_file("filepath", filepath)
        return super().save(filepath, *args, **kwargs)

    def load_weights(self, filepath, *args, **kwargs):
        """`keras.Model.load_weights`; a file that holds a privacy ledger brings it.

        Raises:
          ValueError: for a legacy `.h5`/`.hdf5` file, which cannot hold the
            ledger of the updates its weights went through.
        """
        fit_inputs.check_weight_file("filepath", filepath)
        return super().load_weights(filepath, *args, **kwargs)

    def evaluate(self, *args, **kwargs):
        """`keras.Model.evaluate` (the test step is the plain one: no DP needed)."""
        bound = inspect.signature(keras.Model.evaluate).bind(self, *args, **kwargs)
        spec = _label_spec(bound.arguments)
        if spec is not None and self._label_spec is None:
            self._label_spec = spec
        return super().evaluate(*args, **kwargs)

    def train_on_batch(self, *args, **kwargs):
        """Refused: a single batch carries no sampling the accountant can count.

        Raises:
          ValueError: always. Under sampling="poisson" a batch outside a
            Poisson pipeline is not a Poisson sample; under
            sampling="shuffled" the epochs that the accounting counts are
            `fit`'s, and batches fed one by one could revisit an example
            within what would be counted as one epoch.
        """
        raise ValueError(
            "DPKerasModel.train_on_batch is not supported: the accountant could not "
            "know how the batch was sampled. Use fit() with "
            "tan_keras.make_poisson_dataset (sampling='poisson') or with "
            "in-memory arrays (sampling='shuffled')."
        )

    def make_train_function(self, force=False):
        """Keras's train function, without the placeholder of a step that releases nothing.

        With release_train_metrics=False and no noisy clipped fraction the
        train step returns one constant (Keras needs a tensor); the
        callbacks, the progress bar and History get empty logs instead.
        """
        if self.train_function is not None and not force:
            return self.train_function
        super().make_train_function(force=force)
        function = self.train_function
        checks_identity = self._dp_config.sampling == "poisson"

        def train_function(iterator):
            try:
                logs = function(iterator)
            except tf.errors.InvalidArgumentError as error:
                if _OUT_OF_RANGE_VALUE.search(str(error.message)):
                    raise scrubbed_error(error) from None
                raise
            if checks_identity:
                # The compiled step blocked every update since the violation.
                self._raise_on_identity_violation()
            if not self._release_train_metrics:
                logs = {k: v for k, v in logs.items() if k != _NOTHING_RELEASED}
            return logs

        self.train_function = train_function
        return self.train_function

    def _reset_accumulators(self):
        for acc in self._secret_accumulators():
            if tf.distribute.in_cross_replica_context():
                dp_state.assign_zero(acc)
            else:
                acc.assign(tf.zeros_like(acc))
        self._secret.pending.assign(0)
        self._secret.violation.assign(tf.zeros_like(self._secret.violation))

    def _poisson_sampler(self, data):
        """The sampler of a Poisson pipeline `fit` reads, checked against the model, or None.

        `fit` resumes it at the step the ledger releases next
        (`dp_state.SamplerResume`): a pipeline read again (a second fit, one
        drawn ahead by prefetching, weights restored by a callback) then
        continues where the released updates stopped, and the identity check
        finds each step exactly once.
        """
        if not isinstance(data, tf.data.Dataset) or self._dp_config.sampling != "poisson":
            return None
        source = sampling.poisson_source(data)
        if source is None:
            return None
        sampler, transformations = source
        sampling.check_transformations(transformations)
        drawn_for = (sampler.dataset_size, sampler.expected_batch_size)
        accounted = (self._dp_config.dataset_size, self._dp_config.expected_batch_size)
        if drawn_for != accounted:
            raise ValueError(
                "Invalid value for `x`: its PoissonSampler draws for (dataset_size, "
                f"expected_batch_size)={drawn_for} but the model accounts for {accounted}. "
                "Build the PoissonSampler with the model's values."
            )
        return sampler

    def _raise_on_identity_violation(self):
        record = self._secret.violation.numpy()
        if record[0] != step_identity.OK:
            config = self._dp_config
            raise step_identity.SamplingIdentityError(
                step_identity.describe(record, config.dataset_size, config.expected_batch_size)
            )

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

    # -------------------------------------------------------------- train step
    def _unpack(self, data):
        """(x, y, mask, step_end, sample_weight, identity): mask marks the real rows."""
        step_end, sample_weight, identity = None, None, None
        kind = fit_inputs.check_element(self._dp_config, data)
        if kind == fit_inputs.POISSON:
            # The identity is checked against the ledger in train_step.
            x, y, mask, step_end, identity = data
        elif kind == fit_inputs.MICRO_BATCHES:
            x, y, mask, step_end = data
        else:
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            mask = None
            if tf.nest.is_nested(sample_weight):
                # Before the mask: a structure has no one weight per row.
                raise ValueError(
                    "Invalid value for `sample_weight`: expected one weight per example (a "
                    "vector): it weighs the example's whole loss, all outputs together. "
                    "Received: a structure of weights. Put per-output weights into "
                    "loss_weights, or into the loss functions."
                )
            if sample_weight is not None:
                # A weight of 0 leaves the example out, as in Keras.
                mask = tf.cast(tf.reshape(sample_weight, [-1]) > 0, tf.float32)
        if y is None:
            raise ValueError("DPKerasModel.fit needs labels: batches must be (x, y, ...).")
        y = self._labels_per_output(y)
        if mask is None:
            mask = tf.ones(tf.shape(per_example.first_leaf(y))[:1], tf.float32)
        return x, y, mask, step_end, sample_weight, identity

    def _labels_per_output(self, y):
        """`y` as one tensor per output (a list for several outputs)."""
        y = self._output_losses.flat_labels(y)
        if not self._output_losses.several:
            return y
        present = [t for t in y if t is not None]
        rows = tf.shape(present[0])[:1]
        # An output without loss needs no labels: a placeholder keeps the
        # structure (nothing compares it with a prediction).
        return [tf.zeros(rows, tf.float32) if t is None else t for t in y]

    def train_step(self, data):
        """One micro-batch of DP-SGD (docs/tan-method.md, section 1).

        The algorithm's stages, in order: the per-example gradients of the
        micro-batch's examples (their K views averaged), clipped and summed;
        the sum accumulated over the micro-batches of the logical step; at
        the step's end and within the step cap, one noisy update (noise once,
        divided by the expected batch size, EMA and ledger); the metrics of
        the examples that contributed.
        """
        x, y, mask, step_end, sample_weight, identity = self._unpack(data)
        weights = example_weights.example_weights(y, sample_weight, self._class_table)
        y, mask, num_invalid = self._drop_invalid_labels(y, mask)
        model, x, mask, num_bad_ids = self._per_example_inputs(x, mask)
        self._refuse_loss_state(y, self._symbolic_outputs())
        clipped, losses, y_pred = self._clipped_sum(model, x, y, mask, weights)
        self._refuse_loss_state(y, y_pred)
        self._accumulate(clipped)
        step_end = self._ends_logical_step(step_end)
        release = self._releases_update(step_end)
        if identity is not None:
            # On the element as it arrived: (x, y, mask) as the pipeline sealed them.
            content_ok = content_digest.matches(tuple(data[:3]), identity)
            release = tf.logical_and(release, self._identity_holds(identity, step_end, content_ok))
        self._noisy_update(self._accumulated(), release)
        self._close_logical_step(step_end)
        return self._training_logs(
            clipped, losses, y, y_pred, num_invalid + num_bad_ids, weights=weights
        )

    def _symbolic_outputs(self):
        # The outputs' structure of a model with known outputs; else None
        # (a subclassed model: its predictions are known after the pass).
        if not getattr(self, "outputs", None):
            return None
        return _keras_internals.outputs_structure(self)

    def _refuse_loss_state(self, y, y_pred):
        """Refuses a loss that keeps state between examples, when the step is traced.

        The loss runs once per example (or per view): a variable it writes (a
        running mean, a counter of hard examples), or Python state behind a
        `tf.py_function`, carries each example's data
        into the losses, and so the clipped gradients, of every later one:
        one example could move many updates. Checked here, where the labels'
        and predictions' specs are known for every kind of model, before the
        traced step can run once.

        Raises:
          ValueError: naming the `loss` and the variable it writes (or its
            call into Python).
        """
        if self._loss_keeps_no_state or y_pred is None:
            return

        def spec(t):
            return None if t is None else tf.TensorSpec(t.shape, t.dtype)

        specs = (tf.nest.map_structure(spec, y), tf.nest.map_structure(spec, y_pred))
        written = model_analysis.function_writes(self._per_example_loss, *specs, autograph=True)
        # A loss holding training rows or adapted statistics (a closure).
        with tf.init_scope():  # read eagerly, out of the train step's trace
            provenance.discover_adapted()
        data_copies.check_function(self._per_example_loss, *specs, where="The loss")
        if written:
            raise _validate.invalid(
                "loss",
                "a loss that keeps no state between examples",
                f"one that {written[0]}",
                "Evaluated one example at a time, it would carry each example's data into "
                "the clipped gradients of every later one. Compute what it keeps beforehand "
                "(from public data) and pass it as a constant.",
            )
        self._loss_keeps_no_state = True

    def _identity_holds(self, identity, step_end, content_ok):
        """Checks the micro-batch's identity against the ledger (step_identity.py).

        Records the first violation (every replica agrees on it) and returns
        whether no violation happened in this fit: after one, nothing is
        released until the next fit.
        """
        secret, config = self._secret, self._dp_config
        limit = secret.step_limit
        capped = tf.logical_and(limit >= 0, self.dp_steps >= limit)
        replica = tf.distribute.get_replica_context()
        code = step_identity.check(
            identity,
            step_end,
            secret.position,
            secret.pending,
            secret.step_source,
            config.dataset_size,
            config.expected_batch_size,
            replica_id=replica.replica_id_in_sync_group,
            num_replicas=replica.num_replicas_in_sync,
            content_ok=content_ok,
            pinned=secret.stream_pinned,
            pinned_source=secret.pinned_source,
        )
        # Past the step cap nothing is released, so nothing needs to match.
        code = tf.where(capped, tf.constant(step_identity.OK, tf.int64), code)
        if replica.num_replicas_in_sync > 1:
            # Replicas hold different rows of one micro-batch; if they
            # disagree, its rows were mixed.
            bad = tf.cast(tf.not_equal(code, step_identity.OK), tf.int64)
            anywhere = replica.all_reduce(tf.distribute.ReduceOp.SUM, bad) > 0
            code = tf.where(
                tf.logical_and(anywhere, tf.equal(code, step_identity.OK)),
                tf.constant(step_identity.MIXED_ROWS, tf.int64),
                code,
            )
        tag = tf.cast(identity[0], tf.int64)
        record = tf.stack(
            [code, tag[0], tag[1], tf.cast(secret.position, tf.int64), secret.pending]
        )
        first = tf.logical_and(
            tf.equal(secret.violation[0], step_identity.OK),
            tf.not_equal(code, step_identity.OK),
        )
        secret.violation.assign(tf.where(first, record, secret.violation))
        secret.step_source.assign(tf.where(tf.equal(secret.pending, 0), tag[5], secret.step_source))
        return tf.equal(secret.violation[0], step_identity.OK)

    def _drop_invalid_labels(self, y, mask):
        """Drops the examples with a class label out of range in any output (labels.py)."""
        classes = self._output_losses.sparse_classes
        if not self._output_losses.several:
            if classes[0] is None:
                return y, mask, 0.0
            return labels.drop_invalid(y, mask, classes[0])
        real = mask
        y = list(y)
        for index, count in enumerate(classes):
            if count is not None:
                y[index], mask, _ = labels.drop_invalid(y[index], mask, count)
        dropped = tf.logical_and(tf.cast(real, tf.float32) > 0, tf.cast(mask, tf.float32) <= 0)
        return y, mask, tf.reduce_sum(tf.cast(dropped, tf.float32))

    def _per_example_inputs(self, x, mask):
        """(model, views, mask, num_bad_ids): what the per-example routes run, on what.

        The inputs as [batch, K, ...] views; string preprocessing and random
        augmentation run once on the micro-batch (row_prefix.py) and the
        routes run the rest of the model; examples with an invalid id are
        dropped (id_inputs.py).
        """
        ranks = per_example.input_ranks(_keras_internals.inputs_structure(self), x)
        x = per_example.as_views(x, self._dp_config.augmult, ranks)
        model = self
        if self._row_prefix is not None:
            x = self._row_prefix.suffix_views(self, x)
            model = self._row_prefix.suffix
        if self._id_check is None:
            return model, x, mask, 0.0
        by_input = row_prefix.leaves_by_input(model, x)
        x, mask, num_bad_ids = self._id_check.drop_invalid(x, by_input, mask)
        return model, x, mask, num_bad_ids

    def _clipped_sum(self, model, x, y, mask, weights):
        """Per-example gradients of the micro-batch (losses weighted), clipped to C, summed."""
        ghost_layers = self._ghost_layers

        def compute(views, labels, loss_weights=None):
            if self._clipping == "layerwise":
                return layerwise.per_example_gradients(
                    model, self._per_example_loss, views, labels, example_weights=loss_weights
                )
            return per_example.per_example_gradients(
                model,
                self._per_example_loss,
                views,
                labels,
                ghost_layers=ghost_layers,
                example_weights=loss_weights,
                one_at_a_time=self._one_at_a_time,
            )

        variables = model.trainable_variables
        # "auto" sizes chunks by all the variables, ghost kernels included,
        # although those form no per-example gradients: the chunk also bounds
        # the vectorized pass's activations, and budgeting only the formed
        # gradients let WRN-16-4 run unchunked at 1.49x the plain step's
        # peak memory, against 1.03x in chunks of 16, at the same speed.
        clipped, losses, predictions = chunking.clip_in_chunks(
            compute,
            variables,
            x,
            y,
            mask,
            self._dp_config.l2_norm_clip,
            chunking.chunk_size(
                per_example.first_leaf(x).shape[0], variables, self._examples_per_chunk
            ),
            example_weights=weights,
            num_outputs=len(self.outputs),
        )
        if model is not self:
            # The cut model lists the same variables, maybe in another order.
            summed = {id(v): g for v, g in zip(variables, clipped.grad_sum)}
            clipped = clipped._replace(grad_sum=[summed[id(v)] for v in self.trainable_variables])
        return clipped, losses, predictions

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

    def _training_logs(self, clipped, losses, y, y_pred, num_invalid, weights=None):
        if not self._release_train_metrics:
            # Nothing computed without noise on the training examples leaves
            # the step: only the noisy clipped fraction, if released.
            noisy = self._trackers.noisy_clipped
            if noisy is None:
                return _logs_for_strategy({_NOTHING_RELEASED: tf.zeros([])})
            return _logs_for_strategy({noisy.name: noisy.result()})
        # Metrics describe the examples that contributed: padding and zeroed
        # (non-finite) examples are left out, and selected away rather than
        # weighted by 0, since 0 * NaN = NaN would still poison the averages
        # (and trip TerminateOnNaN, EarlyStopping...).
        kept = clipped.kept
        weight = tf.cast(kept, tf.float32)
        self._trackers.loss.update_state(
            tf.where(kept, losses, tf.zeros_like(losses)), sample_weight=weight
        )
        n_real = tf.maximum(clipped.num_examples, 1.0)
        self._trackers.clipped.update_state(
            clipped.num_clipped / n_real, sample_weight=clipped.num_examples
        )
        self._trackers.norm.update_state(clipped.norms, sample_weight=weight)
        # Examples dropped for an invalid label count with the non-finite ones
        # (see labels.py): either way their loss has no value.
        self._trackers.nonfinite.update_state(clipped.num_nonfinite + num_invalid)

        def kept_only(prediction):
            kept_rows = tf.reshape(kept, [-1] + [1] * (prediction.shape.rank - 1))
            return tf.where(kept_rows, prediction, tf.zeros_like(prediction))

        y_pred = tf.nest.map_structure(kept_only, y_pred)
        y = self._output_losses.predictions_like_labels(y, y_pred)
        if type(self).compute_metrics is not keras.Model.compute_metrics:
            # A compute_metrics of one's own decides what the weight means.
            return _logs_for_strategy(self.compute_metrics(None, y, y_pred, weight))
        # Keras updates `metrics` without sample weights (only
        # `weighted_metrics` take them): the padding rows would count as
        # examples. Every compiled metric is masked to the kept rows; the
        # weighted ones also take the examples' weights, as in Keras.
        weighted = weight if weights is None else weight * tf.cast(weights, tf.float32)
        _keras_internals.update_compiled_metrics(self, y, y_pred, weight, weighted)
        return _logs_for_strategy(self.get_metrics_result())

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

    # --------------------------------------------------------------- test step
    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred = self(x, training=False)
        y = self._labels_per_output(y)
        losses = self._per_example_loss(y, y_pred)
        self._trackers.eval_loss.update_state(losses, sample_weight=sample_weight)
        y = self._output_losses.predictions_like_labels(y, y_pred)
        self.compute_metrics(x, y, y_pred, sample_weight)
        logs = {"loss": self._trackers.eval_loss.result()}
        for metric in _keras_internals.compiled_metrics(self):
            result = metric.result()
            logs.update(result if isinstance(result, dict) else {metric.name: result})
        return _logs_for_strategy(logs)

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


def _refuse_training_rows_in_validation(validation_data) -> None:
    """Refuses validation arrays holding training examples (their `val_` metrics are noiseless).

    `val_` metrics are taken to be public (callbacks may decide from them);
    computed on training examples they are training statistics without noise
    (measured: `fit(x, y, validation_data=(x, y))` with EarlyStopping on
    `val_loss` decided the number of updates from the noiseless training loss).
    """
    if not isinstance(validation_data, (tuple, list)) or not validation_data:
        return
    features = validation_data[0]
    if not fit_inputs.is_array(features):
        return
    if any(data_copies.holds_training_rows(a) for a in tf.nest.flatten(features)):
        raise _validate.invalid(
            "validation_data",
            "examples that are not training examples",
            "arrays holding rows of the training data",
            "Their `val_` metrics would be statistics of the training set without noise, and "
            "callbacks (EarlyStopping, ModelCheckpoint, ReduceLROnPlateau) would decide from "
            "them. Hold out validation examples (validation_split, or a split made before "
            "training)",
        )


# Plain Keras training of private weights is refused (plain_training.py).
plain_training.guard(DPKerasModel)


def make_private(
    model: keras.Model, input_shape: Optional[Sequence[int]] = None, **dp_kwargs
) -> DPKerasModel:
    """Makes an existing Keras model private without rewriting it.

    The returned `DPKerasModel` shares the layers (and so the weights) of
    `model`; compile and fit the returned model.

    Args:
      model: A Keras 3 model: functional or Sequential with known inputs, or
        subclassed (then pass `input_shape`).
      input_shape: Shape of one example without the batch axis, for a model
        without known inputs (subclassed): it is called once on a
        `keras.Input` of that shape to make the functional model to train.
        Ignored if the model has inputs.
      **dp_kwargs: The DP arguments of `DPKerasModel` (l2_norm_clip,
        noise_multiplier, expected_batch_size, dataset_size, augmult,
        ema_decay, noise_seed, clipping, examples_per_chunk, sampling,
        release_train_metrics, clipped_fraction_std).

    Returns:
      A `DPKerasModel`.

    Raises:
      ValueError: if `model` is not a Keras 3 model, overrides train_step or
        compute_loss, its inputs are unknown and no `input_shape` is given,
        has a string input, or on a bad DP argument.
    """
    if not isinstance(model, keras.Model):
        raise ValueError(
            "Invalid value for `model`: expected a Keras 3 model (built with `import keras`). "
            f"Received: {type(model).__module__}.{type(model).__name__}. Models of the legacy "
            "Keras 2 package (tf_keras, or tf.keras with TF_USE_LEGACY_KERAS=1) cannot be "
            "trained by tan_keras."
        )
    model_checks.check_no_custom_training_step(model, keras.Model)
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):
        inputs = outputs = None
    known = bool(inputs) and bool(outputs)
    if known:
        # The structures the model was built with (a list or dict of inputs
        # or outputs), so that fit takes the same data as the original model.
        inputs = _keras_internals.inputs_structure(model)
        outputs = _keras_internals.outputs_structure(model)
    elif input_shape is not None:
        if isinstance(input_shape, (str, bytes)) or not hasattr(input_shape, "__iter__"):
            raise _validate.invalid(
                "input_shape", "a sequence of positive integers (one example)", input_shape
            )
        shape = tuple(_validate.positive_int("input_shape", d) for d in input_shape)
        inputs = keras.Input(shape)
        outputs = model(inputs)
        known = True
    if not known:
        raise ValueError(
            f"Invalid value for `input_shape`: expected the shape of one example for a model "
            f"without known inputs (subclassed). Received: input_shape=None for "
            f"model={model.name!r}."
        )
    if isinstance(inputs, list) and len(inputs) == 1:
        inputs = inputs[0]
    if isinstance(outputs, list) and len(outputs) == 1:
        outputs = outputs[0]
    private = DPKerasModel(inputs=inputs, outputs=outputs, name=model.name, **dp_kwargs)
    # The wrapped model's own files (model.save_weights, model.save) carry
    # the ledger too, and a later make_private of it finds the same one.
    ledger_lib.attach(model, private.privacy_ledger)
    return private


def make_private_with_epsilon(model: keras.Model, **kwargs) -> DPKerasModel:
    return budget.calibrated(make_private, model, **kwargs)


make_private_with_epsilon.__doc__ = budget.MAKE_PRIVATE_WITH_EPSILON_DOC
