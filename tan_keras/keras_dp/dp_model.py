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

This module holds the model's construction, settings, config and `compile`;
its other methods come from mixins, one concept each: `fit_entry.py` (`fit`
and the Keras entry points around it), `train_step.py` (one micro-batch up to
its noisy update), `noisy_update.py` (the noisy update and the EMA) and
`secret_state.py` (the ledger's counters, the step cap and the logical step's
un-noised sums). `make_private` is `wrap.py`'s.
"""

from typing import Optional, Union

import keras
import numpy as np
import tensorflow as tf

from tan_keras import (
    _keras_internals,
    _lazy,
    _stack,  # noqa: F401  (refuses another Keras or backend)
    _validate,
)
from tan_keras.keras_dp import (
    budget,
    callback_checks,
    dp_state,
    id_inputs,
    model_checks,
    output_losses,
    plain_training,
    precision,
    regime,
    row_prefix,
)
from tan_keras.keras_dp import ledger as ledger_lib
from tan_keras.keras_dp.dp_config import MODEL_CONFIG_KEYS, DPConfig
from tan_keras.keras_dp.fit_entry import (
    _FitEntry,
    scrubbed_error,  # noqa: F401  (importable from here)
)
from tan_keras.keras_dp.noisy_update import _NoisyUpdate
from tan_keras.keras_dp.secret_state import _SecretState
from tan_keras.keras_dp.train_step import _TrainStep
from tan_keras.mechanism import ghost, layerwise, noise, provenance
from tan_keras.models import layer_rules  # noqa: F401  (the package's layers' rules)

CLIPPING_MODES = ("auto", "ghost", "layerwise", "vectorized")


# What Keras's Functional.get_config writes (the layer graph).
_FUNCTIONAL_CONFIG_KEYS = frozenset(
    {"name", "trainable", "layers", "input_layers", "output_layers"}
)


def _is_float(variable) -> bool:
    return tf.as_dtype(variable.dtype).is_floating


@keras.saving.register_keras_serializable(package="tan_keras")
@_keras_internals.skip_first_batch_build
class DPKerasModel(_FitEntry, _TrainStep, _SecretState, _NoisyUpdate, keras.Model):
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
        # Shape of a batch of labels, for building the compiled metrics.
        self._label_spec = None

    # ------------------------------------------------------------------ config
    @property
    def dp_config(self) -> DPConfig:
        """The validated DP hyper-parameters (`DPConfig`)."""
        return self._dp_config

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
        # Again, as at construction: layers frozen or unfrozen since (keras.io's
        # fine-tuning) change what a training call writes (fit checks again).
        model_checks.check_model_is_dp_compatible(self)
        # Metrics logged as `val_...` or as a key of the package's (fit checks again).
        callback_checks.check_compiled_names(self)
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


# Plain Keras training of private weights is refused (plain_training.py).
plain_training.guard(DPKerasModel)


# make_private and make_private_with_epsilon are wrap.py's, which imports this
# module: they load from there when first read here (an import would be a cycle).
__getattr__ = _lazy.exports(
    __name__,
    {
        "make_private": "tan_keras.keras_dp.wrap",
        "make_private_with_epsilon": "tan_keras.keras_dp.wrap",
    },
)[0]
