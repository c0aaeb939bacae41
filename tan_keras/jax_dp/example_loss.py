"""One example's loss on the JAX backend, and what the step needs beside it.

`example_loss` is what `clipped_sum` differentiates per example: the mean
loss over the example's K views (so views are averaged before clipping),
with the losses its call adds (`add_loss`, activity regularizers: they saw
this example only). Random layers draw per example (their seed states are
offset by the row), and a layer that writes any other state while training
is refused by name: that state would carry batch statistics out of the
clipped step. A loss that writes a variable (a running sum of the labels)
is refused likewise: run per example, it would carry one example into the
losses of the later ones. So is a loss that reads a metric's running value
(metrics update on whole batches, unclipped); one example's loss sees the
metrics at zero. The weight regularizers depend on no data: their gradient is
added outside the clipping (`regularization_gradients`).
"""

import jax
import jax.numpy as jnp
from keras import tree
from keras.src import backend as keras_backend

from tan_keras import _validate


def seed_state_indices(model) -> list:
    """Indices in `non_trainable_variables` of the random layers' generator states."""
    # Dropout and other random layers keep their generator state in
    # non-trainable variables; it is advanced per call, not written from data.
    states = {
        id(generator.state)
        for layer in model._flatten_layers()
        for generator in getattr(layer, "_seed_generators", [])
    }
    return [i for i, v in enumerate(model.non_trainable_variables) if id(v) in states]


def example_loss(model, non_trainable, metrics_state, seed_indices):
    """(params, ((views, labels), row)) -> (loss, outputs) for ONE example (module doc)."""
    config = model.dp_config
    names = [v.path for v in model.non_trainable_variables]
    regularized = sum(v.regularizer is not None for v in model.trainable_variables)

    def one_example_loss(params, example):
        (views, labels), row = example
        if config.augmult == 1:
            views = tree.map_structure(lambda a: a[None], views)
        labels = tree.map_structure(lambda a: jnp.repeat(a[None], config.augmult, axis=0), labels)
        # Each row draws its own randomness (dropout masks): its seed
        # states are offset by its row number within the step.
        state = list(non_trainable)
        for i in seed_indices:
            state[i] = state[i] + jnp.array([row + 1, 0], state[i].dtype)
        kwargs = {"training": True} if model._call_has_training_arg else {}
        outputs, new_state, losses = model.stateless_call(
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
        # The metrics' running values hold earlier batches' examples,
        # unclipped (the metrics update on whole batches): inside one
        # example's loss they start from zero, and a loss reading one it did
        # not update itself is refused.
        mapping = list(zip(model.metrics_variables, metric_values_in_the_loss(metrics_state)))
        with _WriteRecordingScope(state_mapping=mapping) as scope:
            loss = jnp.asarray(model._compile_loss(labels, outputs), jnp.float32)
        _refuse_loss_state(scope.written)
        _refuse_metric_reads(scope.read_only())
        # Losses the call added (add_loss, activity regularizers) saw this
        # example's views only: they are part of its clipped loss. The
        # weight regularizers, last in the list, depend on no data and
        # are added outside the clipping.
        for added in losses[: len(losses) - regularized]:
            loss = loss + jnp.asarray(added, jnp.float32)
        return loss, outputs

    return one_example_loss


def metric_values_in_the_loss(metrics_state) -> list:
    """The metrics' values one example's loss sees: zeros, whatever they hold.

    (Their running values sum earlier batches, unclipped.)
    """
    # (Made from the shapes: the values carry the mesh their sharding names.)
    return [jnp.zeros(jnp.shape(value), value.dtype) for value in metrics_state]


class _WriteRecordingScope(keras_backend.StatelessScope):
    """A stateless scope that records the variables written outside its mapping.

    And the mapped variables (the metrics') read before the code in the
    scope wrote them: a read of a running value, not an update of it.
    """

    def __init__(self, state_mapping):
        super().__init__(state_mapping=state_mapping)
        self._mapped = set(self.state_mapping)
        self._updated = set()
        self._read = []
        self.written = []

    def get_current_value(self, variable):
        if id(variable) in self._mapped and id(variable) not in self._updated:
            self._read.append(variable)
        return super().get_current_value(variable)

    def add_update(self, update):
        variable, _ = update
        self._updated.add(id(variable))
        if id(variable) not in self._mapped:
            self.written.append(variable)
        super().add_update(update)

    def read_only(self) -> list:
        """The mapped variables read and never updated in the scope."""
        return [v for v in self._read if id(v) not in self._updated]


def _refuse_loss_state(written) -> None:
    """Refuses a loss that wrote variables (module doc), as the TensorFlow route does."""
    # Inside the step a write is dropped with the scope: the loss would
    # silently read the value the variable had when the step was compiled.
    # Run per example, a loss that keeps state (a running sum, a counter of
    # hard examples) is not one example's loss, whatever it is for.
    _refuse_loss_use(
        written,
        "keeps no state between examples",
        "writes the variable",
        "Evaluated one example at a time, it would carry each example's data into "
        "the clipped gradients of every later one",
    )


def _refuse_metric_reads(read) -> None:
    """Refuses a loss that reads a metric's running value (module doc)."""
    _refuse_loss_use(
        read,
        "reads no metric's running value",
        "reads the metric variable",
        "The metrics update on whole batches, outside the per-example clipping: "
        "a loss scaled by one (a running training error) would carry earlier "
        "batches' examples, unclipped, into every later example's gradient",
    )


def _refuse_loss_use(variables, expected: str, use: str, why: str) -> None:
    if variables:
        name = getattr(variables[0], "path", None) or variables[0].name
        raise _validate.invalid(
            "loss",
            f"a loss that {expected}",
            f"one that {use} `{name}`",
            f"{why}. Compute it beforehand (from public data) and pass it as a constant.",
        )


def advanced_seed_states(model, trainable, non_trainable, x, seed_indices) -> list:
    """The random layers' generator states after one call, taken from a call on zeros."""
    # The random layers' generators advance by what one call draws,
    # taken from a call on zeros: a layer that wrote data into its
    # generator state would otherwise carry an example out of the step.
    if not seed_indices:
        return []
    views = tree.map_structure(
        lambda a: jnp.zeros(
            (1,) + a.shape[1:] if model.dp_config.augmult == 1 else a.shape[1:], a.dtype
        ),
        x,
    )
    kwargs = {"training": True} if model._call_has_training_arg else {}
    _, new_state = model.stateless_call(trainable, non_trainable, views, **kwargs)
    return [new_state[i] for i in seed_indices]


def regularization_gradients(model, trainable):
    """The gradient of the weight regularizers (no data: outside the clipping), or None."""
    if not any(v.regularizer is not None for v in model.trainable_variables):
        return None

    def penalty(params):
        mapping = list(zip(model.trainable_variables, params))
        with keras_backend.StatelessScope(state_mapping=mapping):
            losses = model._get_regularization_losses()
        return sum((jnp.asarray(loss, jnp.float32) for loss in losses), jnp.float32(0.0))

    return jax.grad(penalty)(trainable)
