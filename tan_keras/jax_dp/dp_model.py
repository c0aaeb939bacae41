"""`DPKerasModel` and `make_private` on Keras 3's JAX backend.

The same DP-SGD as the TensorFlow route: per-example gradients (K views
averaged before clipping), clipping to C over all variables, padding rows
masked, Gaussian noise of std sigma * C added once per logical step, the
noisy sum divided by the expected batch size B. `train_step` is Keras's
stateless JAX step: one call is one whole logical step (its rows are
processed in chunks inside it), so no gradient sum is ever kept in a
variable, and the noise key comes with the step's input from OS entropy.

Training input: in-memory arrays (or dicts and lists of arrays) given to
`fit(x, y, epochs=E)`; the model draws E * round(N / B) Poisson steps itself.
What the TensorFlow route has and this one does not yet (the privacy
ledger carried by weight files, tf.data input, ghost and layerwise clipping,
EMA, the released clipped fraction, budget stops) is refused by argument,
never silently ignored.
"""

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import keras
import numpy as np
from keras import tree
from keras.src import backend as keras_backend

from tan_keras import _keras_internals, _validate
from tan_keras.jax_dp import clipped_sum as clipped_sum_lib
from tan_keras.jax_dp import poisson_steps
from tan_keras.keras_dp.dp_config import DPConfig

# Arguments of the TensorFlow route that this backend does not offer yet, and
# the one value of each it accepts (the default).
_NOT_YET = {
    "clipping": "auto",
    "ema_decay": None,
    "noise_seed": None,
    "sampling": "poisson",
    "clipped_fraction_std": None,
}
# The training step of these methods is DPKerasModel's own.
_DP_STEP_METHODS = ("train_step", "compute_loss", "compute_loss_and_updates")


def _refuse_custom_training_step(model: keras.Model, base: type) -> None:
    for name in _DP_STEP_METHODS:
        if getattr(type(model), name) is not getattr(base, name):
            raise ValueError(
                f"{type(model).__name__} overrides {name}(), which private training cannot "
                "honour: DPKerasModel's train_step computes each example's loss with the loss "
                "given to compile(), clips and noises it. Put custom loss logic into the loss "
                "function passed to compile()."
            )


# What Keras's Functional.get_config writes (the layer graph).
_FUNCTIONAL_CONFIG_KEYS = frozenset(
    {"name", "trainable", "layers", "input_layers", "output_layers"}
)
# The DP settings in a config, as either backend's DPKerasModel writes them.
_DP_CONFIG_KEYS = (
    "l2_norm_clip",
    "noise_multiplier",
    "expected_batch_size",
    "dataset_size",
    "augmult",
    "examples_per_chunk",
    "release_train_metrics",
) + tuple(_NOT_YET)


@keras.saving.register_keras_serializable(package="tan_keras")
class DPKerasModel(keras.Model):
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
      **kwargs: Other `keras.Model` keyword arguments; the TensorFlow route's
        `clipping`, `ema_decay`, `noise_seed`, `sampling` and
        `clipped_fraction_std` are accepted only at their defaults.

    Raises:
      ValueError: on a missing or invalid DP argument, an argument this
        backend does not offer yet, float16 computation, or an overridden
        training step.
    """

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
        **kwargs,
    ):
        for name, default in _NOT_YET.items():
            value = kwargs.pop(name, default)
            if value != default:
                raise _validate.invalid(
                    name,
                    f"{default!r} on the JAX backend (the other values exist on the "
                    "TensorFlow backend only, for now)",
                    value,
                )
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
        )
        if examples_per_chunk in ("auto", None):
            examples_per_chunk = 32
        self._examples_per_chunk = _validate.positive_int("examples_per_chunk", examples_per_chunk)
        if not isinstance(release_train_metrics, (bool, np.bool_)):
            raise _validate.invalid("release_train_metrics", "True or False", release_train_metrics)
        self._release_train_metrics = bool(release_train_metrics)
        _refuse_custom_training_step(self, DPKerasModel)
        super().__init__(*args, **kwargs)
        if self.dtype_policy.compute_dtype == "float16":
            raise ValueError(
                "float16 computation is refused: its loss scaling would scale the clipped sum. "
                "Use bfloat16 (same speed on accelerators) or float32."
            )
        self._dp_steps = 0

    @property
    def dp_config(self) -> DPConfig:
        """The model's DP hyper-parameters."""
        return self._dp_config

    @property
    def dp_steps(self) -> int:
        """The noisy updates this model has applied (logical steps)."""
        return self._dp_steps

    @property
    def release_train_metrics(self) -> bool:
        """Whether the train step logs statistics of the training data (see the class doc)."""
        return self._release_train_metrics

    def get_config(self):
        config = super().get_config()
        config.update(self._dp_config.to_dict())
        config["examples_per_chunk"] = self._examples_per_chunk
        config["release_train_metrics"] = self._release_train_metrics
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        dp_kwargs = {key: config.pop(key) for key in _DP_CONFIG_KEYS if key in config}
        unknown = sorted(set(config) - _FUNCTIONAL_CONFIG_KEYS)
        if unknown:
            raise ValueError(
                f"Invalid DPKerasModel config: unknown keys {unknown}; on the JAX backend, a "
                "model saved with settings of the TensorFlow route only (a privacy ledger, "
                "provenance marks) cannot be loaded yet."
            )
        return super().from_config({**config, **dp_kwargs}, custom_objects=custom_objects)

    def compile(self, optimizer="rmsprop", loss=None, **kwargs):
        """Keras's `compile`; a loss is required (it is what each example's gradient follows)."""
        if loss is None:
            raise _validate.invalid(
                "loss", "a loss (each example's gradient is that of its loss)", loss
            )
        super().compile(optimizer=optimizer, loss=loss, **kwargs)
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            raise _validate.invalid(
                "optimizer", "an optimizer without loss scaling", type(self.optimizer).__name__
            )

    def compile_from_config(self, config):
        """Recompiles a loaded model from its saved compile config."""
        self.compile(**keras.saving.deserialize_keras_object(config))

    def _devices(self):
        """(mesh, batch axis, device count) of a data-parallel distribution, else Nones and 1."""
        if jax.process_count() > 1:
            # Every process would draw its own Poisson steps from its copy of
            # the data: examples twice in a step, another sampling rate.
            raise ValueError(
                f"DP training on the JAX backend runs in one process (this is one of "
                f"{jax.process_count()}); several hosts are not supported yet."
            )
        distribution = keras.distribution.distribution()
        if distribution is None:
            return None, None, 1
        if not isinstance(distribution, keras.distribution.DataParallel):
            raise ValueError(
                f"Invalid distribution: {type(distribution).__name__}. DP training on the JAX "
                "backend runs on one device or under keras.distribution.DataParallel."
            )
        from keras.src.backend.jax import distribution_lib

        mesh = distribution_lib._to_backend_mesh(distribution.device_mesh)
        axis = distribution.batch_dim_name
        return mesh, axis, mesh.shape[axis]

    def fit(
        self,
        x=None,
        y=None,
        batch_size=None,
        epochs=1,
        validation_split=0.0,
        validation_data=None,
        **kwargs,
    ):
        """Trains on in-memory arrays with Poisson-sampled logical steps.

        Args:
          x: The training inputs: an array, or a dict or list of arrays, with
            one row per example (K views per row when augmult > 1).
          y: The labels, one row per example.
          batch_size: None, or the expected batch size B (the model's).
          epochs: E: the model trains E * round(N / B) noisy steps.
          validation_split: A fraction in [0, 1) of the rows (the last ones)
            held out before sampling and used as validation data.
          validation_data: As in Keras.
          **kwargs: Other `keras.Model.fit` arguments (callbacks, verbose,
            initial_epoch). `steps_per_epoch`, `shuffle`, `sample_weight` and
            `class_weight` are refused: the model draws its steps itself.

        Returns:
          Keras's History.

        Raises:
          ValueError: for input that is not in-memory arrays, row counts that
            do not match `dataset_size`, a `batch_size` other than B, or a
            refused argument.
        """
        config = self._dp_config
        if self.steps_per_execution != 1:
            # Keras would pull whole executions of steps from the endless
            # Poisson stream: more steps than E * round(N / B), counted once.
            raise _validate.invalid(
                "steps_per_execution",
                "1 (in compile) for private training on the JAX backend",
                self.steps_per_execution,
            )
        for name in ("steps_per_epoch", "sample_weight", "class_weight", "shuffle"):
            if kwargs.get(name) is not None:
                raise _validate.invalid(
                    name, "None (the model draws its Poisson steps itself)", kwargs[name]
                )
        if batch_size is not None and batch_size != config.expected_batch_size:
            raise _validate.invalid(
                "batch_size",
                f"None or the model's expected_batch_size ({config.expected_batch_size})",
                batch_size,
            )
        leaves = tree.flatten((x, y))
        if y is None or not leaves or not all(isinstance(a, np.ndarray) for a in leaves):
            raise ValueError(
                "Invalid value for `x`/`y`: expected in-memory numpy arrays (or dicts or lists "
                "of them) with one row per example; on the JAX backend the model draws its "
                f"Poisson steps from them. Received: x={type(x).__name__}, y={type(y).__name__}."
            )
        validation_split = _validate.real(
            "validation_split", validation_split, low=0.0, high=1.0, high_inclusive=False
        )
        rows = len(leaves[0])
        if any(len(a) != rows for a in leaves):
            raise ValueError(
                f"Invalid value for `x`/`y`: every array needs the same number of rows. "
                f"Received: {sorted({len(a) for a in leaves})}."
            )
        if validation_split:
            if validation_data is not None:
                raise _validate.invalid(
                    "validation_split", "0 when validation_data is given", validation_split
                )
            held = int(rows * validation_split)
            split = rows - held
            validation_data = tree.map_structure(lambda a: a[split:], (x, y))
            x, y = tree.map_structure(lambda a: a[:split], (x, y))
            rows = split
        if rows != config.dataset_size:
            raise _validate.invalid(
                "dataset_size",
                f"the number of training rows given to fit ({rows}, after any validation "
                "split): q = B / N must describe the sampling",
                config.dataset_size,
            )
        if config.augmult > 1:
            bad = [a.shape for a in tree.flatten(x) if a.ndim < 2 or a.shape[1] != config.augmult]
            if bad:
                raise ValueError(
                    f"Invalid value for `x`: with augmult={config.augmult} every input needs "
                    f"the shape [N, {config.augmult}, ...] (the views of each example). "
                    f"Received: shapes {bad}."
                )
        epochs = _validate.positive_int("epochs", epochs)
        _, _, devices = self._devices()
        one_view = tree.map_structure(lambda a: a[:1, 0] if config.augmult > 1 else a[:1], x)
        self._symbolic_build(data_batch=(one_view, tree.map_structure(lambda a: a[:1], y)))
        steps = poisson_steps.poisson_steps(
            x,
            y,
            config.sampling_rate,
            config.expected_batch_size,
            row_multiple=self._examples_per_chunk * devices,
        )
        callbacks = list(kwargs.pop("callbacks", None) or []) + [_StepCounter(self)]
        return super().fit(
            steps,
            epochs=epochs,
            steps_per_epoch=_steps_per_epoch(config),
            validation_data=validation_data,
            callbacks=callbacks,
            shuffle=False,
            **kwargs,
        )

    def train_on_batch(self, *args, **kwargs):
        """Refused: a single batch is not a Poisson step; use `fit`."""
        raise ValueError(
            "train_on_batch is refused: a batch the caller chose is not a Poisson step. Train "
            "with fit(x, y, epochs=...), which draws its steps itself."
        )

    def _seed_state_indices(self):
        # Dropout and other random layers keep their generator state in
        # non-trainable variables; it is advanced per call, not written from data.
        states = {
            id(generator.state)
            for layer in self._flatten_layers()
            for generator in getattr(layer, "_seed_generators", [])
        }
        return [i for i, v in enumerate(self.non_trainable_variables) if id(v) in states]

    def _example_loss(self, non_trainable, metrics_state, seed_indices):
        config = self._dp_config
        names = [v.path for v in self.non_trainable_variables]
        regularized = sum(v.regularizer is not None for v in self.trainable_variables)

        def example_loss(params, example):
            (views, labels), row = example
            if config.augmult == 1:
                views = tree.map_structure(lambda a: a[None], views)
            labels = tree.map_structure(
                lambda a: jnp.repeat(a[None], config.augmult, axis=0), labels
            )
            # Each row draws its own randomness (dropout masks): its seed
            # states are offset by its row number within the step.
            state = list(non_trainable)
            for i in seed_indices:
                state[i] = state[i] + jnp.array([row + 1, 0], state[i].dtype)
            kwargs = {"training": True} if self._call_has_training_arg else {}
            outputs, new_state, losses = self.stateless_call(
                params, state, views, return_losses=True, **kwargs
            )
            for i, (old, new) in enumerate(zip(state, new_state)):
                if i not in seed_indices and new is not old:
                    raise ValueError(
                        f"The model writes the variable {names[i]!r} when it trains: a state "
                        "computed from the training batch (BatchNormalization's moving "
                        "statistics, for instance) is not clipped per example. Freeze the "
                        "layer (trainable=False and call it with training=False) or use "
                        "GroupNormalization/LayerNormalization."
                    )
            mapping = list(zip(self.metrics_variables, metrics_state))
            with keras_backend.StatelessScope(state_mapping=mapping):
                loss = jnp.asarray(self._compile_loss(labels, outputs), jnp.float32)
            # Losses the call added (add_loss, activity regularizers) saw this
            # example's views only: they are part of its clipped loss. The
            # weight regularizers, last in the list, depend on no data and
            # are added outside the clipping.
            for added in losses[: len(losses) - regularized]:
                loss = loss + jnp.asarray(added, jnp.float32)
            return loss, outputs

        return example_loss

    def _advanced_seed_states(self, trainable, non_trainable, x, seed_indices):
        # The random layers' generators advance by what one call draws,
        # taken from a call on zeros: a layer that wrote data into its
        # generator state would otherwise carry an example out of the step.
        if not seed_indices:
            return []
        views = tree.map_structure(
            lambda a: jnp.zeros(
                (1,) + a.shape[1:] if self._dp_config.augmult == 1 else a.shape[1:], a.dtype
            ),
            x,
        )
        kwargs = {"training": True} if self._call_has_training_arg else {}
        _, new_state = self.stateless_call(trainable, non_trainable, views, **kwargs)
        return [new_state[i] for i in seed_indices]

    def _regularization_gradients(self, trainable):
        if not any(v.regularizer is not None for v in self.trainable_variables):
            return None

        def penalty(params):
            mapping = list(zip(self.trainable_variables, params))
            with keras_backend.StatelessScope(state_mapping=mapping):
                losses = self._get_regularization_losses()
            return sum((jnp.asarray(loss, jnp.float32) for loss in losses), jnp.float32(0.0))

        return jax.grad(penalty)(trainable)

    def train_step(self, state, data):
        trainable, non_trainable, optimizer_state, metrics_state = state
        x, y, step = data
        keep = step["keep"]
        config = self._dp_config
        seed_indices = self._seed_state_indices()
        mesh, axis, _ = self._devices()
        rows = jnp.arange(keep.shape[0], dtype=jnp.uint32)
        result = clipped_sum_lib.clipped_sum(
            self._example_loss(non_trainable, metrics_state, seed_indices),
            trainable,
            ((x, y), rows),
            keep,
            config.l2_norm_clip,
            self._examples_per_chunk,
            mesh=mesh,
            batch_axis=axis,
        )
        advanced = self._advanced_seed_states(trainable, non_trainable, x, seed_indices)
        noisy = clipped_sum_lib.add_noise(result.grads, step["noise_key"][0], config.noise_stddev)
        grads = [g / config.expected_batch_size for g in noisy]
        regularization = self._regularization_gradients(trainable)
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
        logs = {}
        if self._release_train_metrics:
            logs, metrics_state = self._training_logs(metrics_state, y, outputs, keep, result)
        return logs, (trainable, non_trainable, optimizer_state, metrics_state)

    def _training_logs(self, metrics_state, y, outputs, keep, result):
        # Statistics of the examples that contributed: padding and non-finite
        # rows are selected away (0 * NaN would still poison an average), and
        # each example weighs 1 in all, whatever its number of views.
        views = self._dp_config.augmult
        kept = jnp.logical_and(keep, jnp.logical_not(result.nonfinite))
        real = kept.astype(jnp.float32)
        count = jnp.sum(real)

        def kept_views(prediction):
            rows = kept.reshape((-1,) + (1,) * (prediction.ndim - 1))
            prediction = jnp.where(rows, prediction, jnp.zeros_like(prediction))
            return prediction.reshape((-1,) + prediction.shape[2:])

        labels = tree.map_structure(lambda a: jnp.repeat(a, views, axis=0), y)
        weights = jnp.repeat(real / views, views)
        mapping = list(zip(self.metrics_variables, metrics_state))
        with keras_backend.StatelessScope(state_mapping=mapping) as scope:
            mean_loss = jnp.sum(jnp.where(kept, result.losses, 0.0)) / jnp.maximum(count, 1.0)
            self._loss_tracker.update_state(mean_loss, sample_weight=count)
            # Keras updates `metrics` without sample weights: padding rows
            # would count as examples, so every compiled metric gets them.
            _keras_internals.update_compiled_metrics(
                self, labels, tree.map_structure(kept_views, outputs), weights, weights
            )
            logs = dict(self.get_metrics_result())
        new_state = []
        for ref, value in zip(self.metrics_variables, metrics_state):
            current = scope.get_current_value(ref)
            new_state.append(value if current is None else current)
        clipped = jnp.logical_and(kept, result.norms > self._dp_config.l2_norm_clip)
        logs["grad_norm"] = jnp.sum(jnp.where(kept, result.norms, 0.0)) / jnp.maximum(count, 1.0)
        logs["clipped_fraction"] = jnp.sum(clipped) / jnp.maximum(count, 1.0)
        logs["nonfinite_examples"] = jnp.sum(result.nonfinite)
        return logs, new_state


class _StepCounter(keras.callbacks.Callback):
    """Counts the noisy updates: each train batch is one logical step."""

    def __init__(self, model: DPKerasModel):
        super().__init__()
        self._private_model = model

    def on_train_batch_end(self, batch, logs=None):
        self._private_model._dp_steps += 1


def training_state(model: keras.Model) -> tuple:
    """The state Keras's JAX `train_step` takes, read from a compiled, built model.

    Args:
      model: A compiled model whose layers are built.

    Returns:
      (trainable, non-trainable, optimizer, metrics) variable values, as lists.
    """
    model.optimizer.build(model.trainable_variables)
    return tuple(
        [v.value for v in variables]
        for variables in (
            model.trainable_variables,
            model.non_trainable_variables,
            model.optimizer.variables,
            model.metrics_variables,
        )
    )


def make_private(
    model: keras.Model, input_shape: Optional[Sequence[int]] = None, **dp_kwargs
) -> DPKerasModel:
    """Makes an existing Keras model private (JAX backend); it shares its weights.

    Args:
      model: A functional or Sequential Keras 3 model with known inputs, or a
        subclassed one (then pass `input_shape`).
      input_shape: The shape of one example, for a model without known inputs.
      **dp_kwargs: The DP arguments of `DPKerasModel`.

    Returns:
      A `DPKerasModel` over the same layers.

    Raises:
      ValueError: if `model` is not a Keras model, overrides its training
        step, has no known inputs and no `input_shape`, or on a bad DP argument.
    """
    if not isinstance(model, keras.Model):
        raise _validate.invalid("model", "a Keras 3 model", type(model).__name__)
    _refuse_custom_training_step(model, keras.Model)
    try:
        known = bool(model.inputs) and bool(model.outputs)
    except (AttributeError, ValueError):
        known = False
    if known:
        inputs = _keras_internals.inputs_structure(model)
        outputs = _keras_internals.outputs_structure(model)
    elif input_shape is not None:
        shape = tuple(_validate.positive_int("input_shape", d) for d in input_shape)
        inputs = keras.Input(shape)
        outputs = model(inputs)
    else:
        raise _validate.invalid(
            "input_shape", "the shape of one example for a subclassed model", input_shape
        )
    if isinstance(inputs, list) and len(inputs) == 1:
        inputs = inputs[0]
    if isinstance(outputs, list) and len(outputs) == 1:
        outputs = outputs[0]
    return DPKerasModel(inputs=inputs, outputs=outputs, name=model.name, **dp_kwargs)


def _steps_per_epoch(config: DPConfig) -> int:
    """round(N / B): the logical steps of one epoch of `fit`."""
    return max(1, int(math.floor(config.dataset_size / config.expected_batch_size + 0.5)))
