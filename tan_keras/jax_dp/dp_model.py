"""`DPKerasModel` and `make_private` on Keras 3's JAX backend.

The same DP-SGD as the TensorFlow route: per-example gradients (K views
averaged before clipping), clipping to C over all variables, padding rows
masked, Gaussian noise of std sigma * C added once per logical step, the
noisy sum divided by the expected batch size B. `train_step` is Keras's
stateless JAX step: one call is one whole logical step (its rows are
processed in chunks inside it), so no gradient sum is ever kept in a
variable, and the noise key comes with the step's input from OS entropy.

Training input: in-memory arrays (or dicts and lists of arrays) given to
`fit(x, y, epochs=E)`, or a random-access source of examples
(`example_source.py`); the model draws E * round(N / B) Poisson steps itself.
The privacy ledger is the TensorFlow route's (`keras_dp/ledger.py`): bound
to the weights, shared by every private model over them, carried by Keras
weight files, recognised in weights copied as arrays; a budget
(`PrivacyAccountant`, `make_private_with_epsilon`) caps the Poisson steps
the model draws (`fit` and its checks: `fit_entry.py`). What the
TensorFlow route has and this one does not yet (tf.data input, layerwise
clipping, a debugging noise seed) is refused by argument, never silently
ignored.
"""

import contextlib
from typing import Optional

import jax.numpy as jnp
import keras
import numpy as np
from keras import tree

from tan_keras import _keras_internals, _validate
from tan_keras.jax_dp import (
    clipped_fraction,
    fit_entry,
    ghost_norms,
    jax_step,
    model_config,
    train_logs,
)
from tan_keras.jax_dp import clipped_sum as clipped_sum_lib
from tan_keras.jax_dp import ema as ema_lib
from tan_keras.jax_dp import example_loss as example_loss_lib
from tan_keras.keras_dp import budget, optimizer_state, plain_training
from tan_keras.keras_dp import ledger as ledger_lib
from tan_keras.keras_dp.dp_config import DPConfig
from tan_keras.mechanism import provenance


@keras.saving.register_keras_serializable(package="tan_keras")
class DPKerasModel(fit_entry.FitEntry, keras.Model):
    """A `keras.Model` trained with DP-SGD, on the JAX backend.

    Args:
      *args: Positional arguments of `keras.Model` (inputs, outputs).
      l2_norm_clip: C > 0, per-example clip norm (global over all variables).
      noise_multiplier: sigma >= 0; the noise std on the sum is sigma * C.
      expected_batch_size: B; the noisy sum is divided by it.
      dataset_size: N, the number of distinct training examples.
      augmult: K >= 1 views per example; with K > 1 the training inputs are
        `[N, K, *input_shape]` and the views' gradients are averaged before
        clipping.
      examples_per_chunk: How many per-example gradients are formed at
        once (bounded memory, same result). "auto" (default): 32.
      release_train_metrics: True (default): the train step returns, and
        Keras prints and logs, statistics computed WITHOUT noise on the drawn
        training examples: loss, the compiled metrics, grad_norm,
        clipped_fraction, nonfinite_examples. They are not covered by the
        privacy guarantee (a callback that acts on them, ReduceLROnPlateau
        or EarlyStopping monitoring a training metric, is not either).
        False: the train step returns no statistic of the training data.
      clipped_fraction_std: None (default), or the std s > 0 of a privately
        released clipped fraction, logged as `noisy_clipped_fraction`
        (`clipped_fraction.py`); epsilon accounts it with the update.
      ema_decay: Optional EMA decay d in [0, 1) of the weights, with warm-up
        d_t = min(d, (1 + t) / (10 + t)); see `ema_weights()`.
      clipping: "auto" (default): the kernels of plain Dense layers and
        the tables of Embedding layers are clipped by their ghost norms
        where that is cheaper than forming their per-example gradients
        (`ghost_norms.py`), every other weight by its per-example gradient;
        "vectorized": every weight by its per-example gradient. The same
        clipped sum either way.
      **kwargs: Other `keras.Model` keyword arguments; the TensorFlow route's
        `noise_seed` and `sampling` are accepted only at their defaults.

    Raises:
      ValueError: on a missing or invalid DP argument, an argument this
        backend does not offer yet, float16 computation, or an overridden
        training step.
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
        examples_per_chunk="auto",
        release_train_metrics: bool = True,
        ema_decay: Optional[float] = None,
        clipped_fraction_std: Optional[float] = None,
        clipping: str = "auto",
        **kwargs,
    ):
        model_config.refuse_options_not_ported(kwargs)
        self._clipping = model_config.checked_clipping(clipping)
        required = dict(
            l2_norm_clip=l2_norm_clip,
            noise_multiplier=noise_multiplier,
            expected_batch_size=expected_batch_size,
            dataset_size=dataset_size,
        )
        missing = [name for name, value in required.items() if value is None]
        if missing:
            raise ValueError(f"DPKerasModel needs its DP settings; missing: {', '.join(missing)}.")
        self._dp_config = DPConfig(
            l2_norm_clip=l2_norm_clip,
            noise_multiplier=noise_multiplier,
            expected_batch_size=expected_batch_size,
            dataset_size=dataset_size,
            augmult=augmult,
            clipped_fraction_std=clipped_fraction_std,
        )
        if examples_per_chunk in ("auto", None):
            examples_per_chunk = 32
        self._examples_per_chunk = _validate.positive_int("examples_per_chunk", examples_per_chunk)
        if not isinstance(release_train_metrics, (bool, np.bool_)):
            raise _validate.invalid("release_train_metrics", "True or False", release_train_metrics)
        self._release_train_metrics = bool(release_train_metrics)
        model_config.refuse_custom_training_step(self, DPKerasModel)
        super().__init__(*args, **kwargs)
        if self.dtype_policy.compute_dtype == "float16":
            raise ValueError(
                "float16 computation is refused: its loss scaling would scale the clipped sum. "
                "Use bfloat16 (same speed on accelerators) or float32."
            )
        # Preprocessing state adapted on data is refused unless vouched for
        # (provenance.py); a model being loaded gets its saved marks back first.
        provenance.apply_restored(self)
        provenance.check(self)
        # The released noisy clipped fraction's epoch mean (None: not released).
        self.noisy_clipped_tracker = (
            clipped_fraction.tracker() if clipped_fraction_std is not None else None
        )
        # The shadows are made before the ledger binds the weights: they
        # are weights of the model, with the same history.
        self._ema_decay = ema_lib.checked_decay(ema_decay)
        self._ema_sources, self._ema_variables = ema_lib.make_shadows(self.weights, ema_decay)
        # The ledger of these weights, the TensorFlow route's
        # (keras_dp/ledger.py): a second make_private over them, or a model
        # over a privately trained model's layers, shares it; weight files
        # carry it; weights copied as arrays from a trained model bring it.
        ledger = ledger_lib.ledger_of(self.weights) or ledger_lib.PrivacyLedger()
        object.__setattr__(self, "_privacy_ledger", ledger)
        ledger.counters(self._dp_config.mechanism, owner=self)
        ledger_lib.bind(ledger, self.weights)
        for layer in _keras_internals.all_layers(self, include_self=True):
            if layer is self or isinstance(layer, keras.Model) or layer.weights:
                ledger_lib.attach(layer, ledger)
        ledger_lib.recall(self, ledger)
        self._step_limit = None

    @property
    def dp_config(self) -> DPConfig:
        """The model's DP hyper-parameters."""
        return self._dp_config

    @property
    def privacy_ledger(self) -> ledger_lib.PrivacyLedger:
        """Every private release these weights went through (`ledger.PrivacyLedger`).

        `model.privacy_ledger.epsilon(delta)` is the epsilon they spent.
        """
        return self._privacy_ledger.root()

    @property
    def dp_steps(self) -> ledger_lib.HostCounter:
        """Noisy updates of this model's mechanism these weights went through (read it).

        Its count in the privacy ledger (`privacy_ledger`), shared with every
        private model of the same mechanism over these weights, and brought
        back by their weight files; it only moves forward. Read it as on the
        TensorFlow backend: `int(model.dp_steps)` or `model.dp_steps.numpy()`.
        """
        return self._counters().steps

    def set_step_limit(self, steps: Optional[int]) -> None:
        """Caps the total number of noisy updates (None removes the cap).

        Enforced by the model's own Poisson steps: `fit` draws no step once
        `dp_steps` would pass the cap, whatever the callbacks do. The
        `PrivacyAccountant` callback sets it from its budget.

        Args:
          steps: The cap, an integer >= 0, or None.

        Raises:
          ValueError: if `steps` is not None or an integer >= 0.
        """
        self._step_limit = None if steps is None else _validate.integer("steps", steps, low=0)

    @property
    def step_limit(self) -> Optional[int]:
        """The cap on the total number of noisy updates (None: none), set by `set_step_limit`."""
        return self._step_limit

    def _counters(self):
        return self.privacy_ledger.counters(self._dp_config.mechanism, owner=self)

    @property
    def ema_decay(self) -> Optional[float]:
        """The EMA decay d, or None (no EMA kept)."""
        return self._ema_decay

    @property
    def ema_variables(self):
        """EMA shadows of the trainable variables, in their order (None without `ema_decay`)."""
        if self._ema_variables is None:
            return None
        return ema_lib.shadows_of(self._ema_sources, self._ema_variables, self.trainable_variables)

    @contextlib.contextmanager
    def ema_weights(self):
        """Context manager: the model holds its EMA weights inside the block.

        Example: `with model.ema_weights(): model.evaluate(x_test, y_test)`.

        Raises:
          ValueError: if the model has no EMA (`ema_decay` was None).
        """
        if self._ema_variables is None:
            raise ValueError(
                "This DPKerasModel keeps no EMA of its weights: pass ema_decay (e.g. 0.999)."
            )
        # Only what trains has an average; a frozen weight is used as it is.
        with ema_lib.swapped_in(self.trainable_variables, self.ema_variables):
            yield self

    @property
    def release_train_metrics(self) -> bool:
        """Whether the train step logs statistics of the training data (see the class doc)."""
        return self._release_train_metrics

    def get_config(self):
        config = super().get_config()
        config.update(self._dp_config.to_dict())
        config["examples_per_chunk"] = self._examples_per_chunk
        config["release_train_metrics"] = self._release_train_metrics
        config["ema_decay"] = self._ema_decay
        config["clipping"] = self._clipping
        marks = provenance.to_config(self)
        if marks:
            config[provenance.CONFIG_KEY] = marks
        config.update(budget.to_config(self.privacy_budget))
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        saved_budget = config.pop(budget.CONFIG_KEY, None)
        marks = config.pop(provenance.CONFIG_KEY, None)
        with provenance.restoring(marks):
            model = super().from_config(
                model_config.accepted(config), custom_objects=custom_objects
            )
        budget.restore(model, saved_budget)
        return model

    def compile(self, optimizer="rmsprop", loss=None, **kwargs):
        """Keras's `compile`; a loss is required (it is what each example's gradient follows).

        Args:
          optimizer: As in Keras: a name, or an optimizer that is new or was
            built for this model's trainable variables.
          loss: The loss (required).
          **kwargs: Keras's other `compile` arguments.

        Raises:
          ValueError: without a loss; for a loss-scaling optimizer, or one
            built for other variables (another model's optimizer object,
            whose slots would carry that model's noisy updates into this
            one's unaccounted: `optimizer_state.py`).
        """
        if loss is None:
            raise _validate.invalid(
                "loss", "a loss (each example's gradient is that of its loss)", loss
            )
        super().compile(optimizer=optimizer, loss=loss, **kwargs)
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            raise _validate.invalid(
                "optimizer", "an optimizer without loss scaling", type(self.optimizer).__name__
            )
        optimizer_state.check_built_for(self.optimizer, self.trainable_variables)
        optimizer_state.check_keeps_no_weight_average(self.optimizer)

    def compile_from_config(self, config):
        """Recompiles a loaded model from its saved compile config.

        The optimizer is built here, as Keras's own `compile_from_config`
        does: the file's optimizer variables (momentum, the iteration count)
        load only into a built optimizer, and were otherwise skipped, so a
        loaded model resumed with fresh momentum.
        """
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def train_step(self, state, data):
        trainable, non_trainable, optimizer_state, metrics_state = state
        x, y, step = data
        keep = step["keep"]
        config = self._dp_config
        seed_indices = example_loss_lib.seed_state_indices(self)
        mesh, axis, _ = jax_step.data_parallel()
        rows = jnp.arange(keep.shape[0], dtype=jnp.uint32)
        loss_fn = example_loss_lib.example_loss(self, non_trainable, metrics_state, seed_indices)
        examples = ((x, y), rows)
        ghost = []
        if self._clipping == "auto":
            first = tree.map_structure(lambda a: a[0], examples)
            ghost = ghost_norms.ghost_weights(self, loss_fn, trainable, first)
        result = clipped_sum_lib.clipped_sum(
            loss_fn,
            trainable,
            examples,
            keep,
            config.l2_norm_clip,
            self._examples_per_chunk,
            mesh=mesh,
            batch_axis=axis,
            ghost=ghost,
        )
        advanced = example_loss_lib.advanced_seed_states(
            self, trainable, non_trainable, x, seed_indices
        )
        noisy = clipped_sum_lib.add_noise(result.grads, step["noise_key"][0], config.noise_stddev)
        grads = [g / config.expected_batch_size for g in noisy]
        regularization = example_loss_lib.regularization_gradients(self, trainable)
        if regularization is not None:
            grads = [g + r for g, r in zip(grads, regularization)]
        grads = [g.astype(v.dtype) for g, v in zip(grads, trainable)]
        trainable, optimizer_state = self.optimizer.stateless_apply(
            optimizer_state, grads, trainable
        )
        outputs = result.outputs
        non_trainable = list(non_trainable)
        for i, value in zip(seed_indices, advanced):
            non_trainable[i] = value
        if self._ema_variables is not None:
            indices = ema_lib.shadow_indices(self, self.ema_variables)
            non_trainable = ema_lib.updated(
                non_trainable, indices, trainable, self._ema_decay, step["step"][0]
            )
        logs = {}
        if self._release_train_metrics:
            logs, metrics_state = train_logs.training_logs(
                self, metrics_state, y, outputs, keep, result
            )
        if self.noisy_clipped_tracker is not None:
            released, metrics_state = clipped_fraction.release(
                self, metrics_state, result, keep, step["noise_key"][0]
            )
            logs.update(released)
        return logs, (trainable, non_trainable, optimizer_state, metrics_state)


# Plain Keras training of private weights is refused (plain_training.py).
plain_training.guard(DPKerasModel)
