"""Every private Keras API tan_keras relies on, in one place.

Keras 3 has no public route for these. Keeping them here means a new Keras
release is one file's work, and nothing else in the package imports from
`keras.src` or calls a private Keras method.
"""

from typing import Any, List, Optional, Tuple

import keras
from keras import tree
from keras.src.models import functional
from keras.src.utils.naming import get_object_name


def all_layers(model: keras.layers.Layer, include_self: bool = False) -> List[Any]:
    """Every layer inside `model`, nested models' layers included, each once.

    Args:
      model: A Keras model or layer.
      include_self: Whether `model` itself is listed (first).

    Returns:
      The layers, outer ones first.
    """
    return list(model._flatten_layers(include_self=include_self, recursive=True))


def functional_types() -> Tuple[type, ...]:
    """The container classes of functional and Sequential models."""
    return (functional.Functional, keras.Sequential)


def compiled_metrics(model: keras.Model) -> List[keras.metrics.Metric]:
    """The metrics given to `compile(metrics=...)` (a container metric), or []."""
    container = getattr(model, "_compile_metrics", None)
    return [] if container is None else [container]


def compiled_log_names(model: keras.Model) -> List[Tuple[str, str]]:
    """The names the metrics and losses given to `compile` may be logged under.

    Keras logs a compiled metric under its name (a string identifier as
    given, an object's `name`, a function's snake-cased `__name__`),
    prefixed with its output's name on a model with several outputs, and
    each output's loss as `<output>_loss`. Read from what `compile`
    received, so that it holds before the metrics are built, and from the
    built metrics too (a name changed since). Every output prefix is paired
    with every metric: a superset of what the logs will hold.

    Args:
      model: A Keras model, compiled or not.

    Returns:
      (argument of `compile`, log name) pairs; [] for a model not compiled.
    """
    container = getattr(model, "_compile_metrics", None)
    found = []
    if container is not None:
        for argument, given, built in (
            ("metrics", container._user_metrics, getattr(container, "_flat_metrics", None)),
            (
                "weighted_metrics",
                container._user_weighted_metrics,
                getattr(container, "_flat_weighted_metrics", None),
            ),
        ):
            identifiers = [m for m in tree.flatten(given) if m is not None] if given else []
            for metric_list in built or ():
                identifiers += list(getattr(metric_list, "metrics", None) or ())
            for identifier in identifiers:
                name = identifier if isinstance(identifier, str) else get_object_name(identifier)
                found.append((argument, str(name)))
    outputs = list(getattr(model, "output_names", None) or ())
    if len(outputs) > 1:
        bases = found + [("loss", "loss")]
        found += [(argument, f"{out}_{name}") for out in outputs for argument, name in bases]
    return found


def build_compiled_metrics(model: keras.Model, y_spec) -> None:
    """Creates the compiled metrics (and their variables) before training.

    Keras builds them on the first batch it reads; under a strategy
    DPKerasModel builds them itself (see `skip_first_batch_build`). The
    labels' shape decides what a metric name such as "accuracy" resolves to.

    Args:
      model: A compiled functional model.
      y_spec: Shape and dtype of a batch of labels (a `tf.TensorSpec`, an
        array, or anything with `.shape` and `.dtype`), or a structure of
        them in the structure of the model's outputs.
    """
    container = getattr(model, "_compile_metrics", None)
    if container is None or container.built:
        return
    y_pred = tree.map_structure(
        lambda t: keras.KerasTensor(t.shape, t.dtype), outputs_structure(model)
    )

    def symbolic(spec):
        dtype = keras.backend.standardize_dtype(spec.dtype)
        return keras.KerasTensor((None, *tuple(spec.shape)[1:]), dtype)

    y = tree.map_structure(symbolic, y_spec)
    if tree.is_nested(y_pred) and tree.is_nested(y):
        y = tree.pack_sequence_as(y_pred, tree.flatten(y))
    elif tree.is_nested(y_pred) and len(tree.flatten(y_pred)) == 1:
        y_pred = tree.flatten(y_pred)[0]
    container.build(y, y_pred)


def update_compiled_metrics(model: keras.Model, y_true, y_pred, row_weight, weighted) -> None:
    """Updates the metrics given to `compile` with per-row weights.

    Keras's container updates `metrics` without sample weights and
    `weighted_metrics` with them; here `metrics` get `row_weight` (which
    rows are examples at all) and `weighted_metrics` get `weighted` (those
    rows times the examples' own weights).

    Args:
      model: A compiled model.
      y_true: Labels, in the structure of the outputs.
      y_pred: Predictions.
      row_weight: [batch] weights of the `metrics`.
      weighted: [batch] weights of the `weighted_metrics`.
    """
    container = getattr(model, "_compile_metrics", None)
    if container is None:
        return
    if not container.built:
        container.build(y_true, y_pred)
    y_true = container._flatten_y(y_true)
    y_pred = container._flatten_y(y_pred)
    for metrics, weight in (
        (container._flat_metrics, row_weight),
        (container._flat_weighted_metrics, weighted),
    ):
        for metric, labels, predictions in zip(metrics, y_true, y_pred):
            if metric:
                metric.update_state(labels, predictions, sample_weight=weight)


def inputs_structure(model: keras.Model) -> Any:
    """The model's inputs as it was built with them (a tensor, list or dict)."""
    structure = getattr(model, "_inputs_struct", None)
    return model.inputs if structure is None else structure


def outputs_structure(model: keras.Model) -> Any:
    """The model's outputs as it was built with them (a tensor, list or dict)."""
    structure = getattr(model, "_outputs_struct", None)
    return model.outputs if structure is None else structure


def vocabulary_given(layer: keras.layers.Layer) -> Optional[bool]:
    """Whether a lookup layer's vocabulary was given when it was built.

    Args:
      layer: A Keras layer.

    Returns:
      None for a layer without a vocabulary (Hashing); True when
      `vocabulary=` was passed (StringLookup, TextVectorization, and after
      a reload); False when it came from `adapt` (or `set_vocabulary`).
    """
    given = getattr(layer, "_has_input_vocabulary", None)
    return None if given is None else bool(given)


def skip_first_batch_build(model_class: type) -> type:
    """Makes `fit`/`evaluate` under a strategy build without reading a batch.

    Under a `tf.distribute` strategy, Keras 3 reads the first batch of the
    dataset (and averages it across replicas) only to build the model,
    metrics and optimizer before training. For a DP model that read advances
    the Poisson sampler, discards a micro-batch, and averages a boolean
    step-end flag (an error). DPKerasModel builds its state at `compile`, so
    the class's `_dp_build_for_fit()` replaces that read.

    Args:
      model_class: The Keras Model subclass; it must define
        `_dp_build_for_fit(self)`.

    Returns:
      The same class, with Keras's hook overridden.
    """

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if self._distribute_strategy is None:
            return
        with self.distribute_strategy.scope():
            self._dp_build_for_fit()
            if not self.optimizer.built:
                self.optimizer.build(self.trainable_variables)

    model_class._maybe_symbolic_build = _maybe_symbolic_build
    return model_class


def values_attached(variables) -> bool:
    """Whether every variable holds its value (Keras's JAX `fit` detaches them).

    The JAX trainer detaches the values while it trains and reattaches them
    at its end; a fit that failed before its first step leaves them detached.
    """
    return all(v._value is not None for v in variables)


def own_variables(layer: keras.layers.Layer) -> List[Any]:
    """The variables `layer` itself holds (not those of its sub-layers)."""
    return list(layer._trainable_variables) + list(layer._non_trainable_variables)


def seed_generator_states(layer: keras.layers.Layer) -> List[Any]:
    """The state variables of the `keras.random.SeedGenerator`s `layer` holds.

    Keras 3's random layers (Dropout, GaussianNoise, the random
    augmentations) draw stateless random numbers from a seed that their
    SeedGenerator advances by a constant on each call: a write that holds no
    data.
    """
    return [generator.state for generator in layer._seed_generators]


def graph_operations(model: keras.layers.Layer) -> List[Any]:
    """The operations of a functional model's graph (layers and `keras.ops` calls).

    A Keras 3 functional model may apply `keras.ops` functions (or TF ops
    through them) between layers; those are graph operations, not layers,
    and do not appear among its layers. Returns [] for other layers.
    """
    if isinstance(model, functional.Functional):
        return list(model.operations)
    return []


def submodel(model: keras.Model, inputs: Any, outputs: Any) -> keras.Model:
    """A functional model between two sets of tensors of `model`'s graph.

    Keras builds it by cloning the graph's nodes between intermediate tensors
    and appends the clones to the shared layers' node lists (and re-labels
    `model`'s Input tensors), after which `model.get_config()` (and so
    `model.save`) fails ("could not find node key"). Both are put back: the
    submodel keeps its own nodes.

    Args:
      model: A functional model.
      inputs: Tensors of its graph (or its inputs), a list.
      outputs: Tensors of its graph computed from `inputs`.

    Returns:
      The submodel, sharing `model`'s layers.
    """
    saved = [
        (operation, list(operation._inbound_nodes), list(operation._outbound_nodes))
        for operation in model.operations
    ]
    # Cloning also re-labels the model's own Input tensors with the clones'
    # node index: put their history back too.
    histories = [
        (tensor, tensor._keras_history)
        for _, inbound, _ in saved
        for node in inbound
        for tensor in node.output_tensors
    ]
    try:
        return keras.Model(inputs, outputs)
    finally:
        for operation, inbound, outbound in saved:
            operation._inbound_nodes[:] = inbound
            operation._outbound_nodes[:] = outbound
        for tensor, history in histories:
            tensor._keras_history = history


def optimizer_built_for(optimizer: Any) -> Optional[List[Any]]:
    """The variables a built Keras 3 optimizer updates (None: not built yet).

    A built optimizer keeps one slot per variable it was built for and
    refuses others: after a change of what trains, it cannot be reused.
    """
    if not getattr(optimizer, "built", False):
        return None
    return list(getattr(optimizer, "_trainable_variables", []))


def call_losses(layer: keras.layers.Layer) -> List[Any]:
    """The losses `layer` added with `add_loss` in its latest call."""
    return list(getattr(layer, "_losses", ()))


def functional_graph(layer: Any) -> Optional[functional.Functional]:
    """The functional graph that runs when `layer` is called, or None.

    A functional model runs its own graph, a Sequential model built on a
    known input shape the functional model it keeps; any other layer (and a
    model class that overrides `call`) runs code that no graph describes.
    """
    if isinstance(layer, functional.Functional):
        return layer if type(layer).call is functional.Functional.call else None
    if isinstance(layer, keras.Sequential) and type(layer).call is keras.Sequential.call:
        return getattr(layer, "_functional", None)
    return None


def graph_nodes(graph: functional.Functional) -> List[Any]:
    """The nodes of a functional graph, in an order that runs producers first."""
    by_depth = graph._nodes_by_depth
    return [node for depth in sorted(by_depth, reverse=True) for node in by_depth[depth]]


def node_arguments(node: Any, values: Any) -> Tuple[tuple, dict]:
    """The (args, kwargs) of a graph node's call, its tensors read from `values`.

    Args:
      node: A node of a functional graph (`graph_nodes`).
      values: {id(symbolic tensor): value} for every tensor the node reads.
    """
    return node.arguments.fill_in(values)


def child_layers(layer: keras.layers.Layer) -> List[Any]:
    """The layers `layer` holds directly (not their own sub-layers)."""
    return list(layer._flatten_layers(include_self=False, recursive=False))


def normalization_axes(
    layer: keras.layers.Normalization,
) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """(kept axes, reduced axes) of a built `Normalization`, of its input's axes (0: batch)."""
    return tuple(layer._keep_axis), tuple(layer._reduce_axis)


def normalization_input_shape(layer: keras.layers.Normalization) -> Optional[Tuple]:
    """The input shape a `Normalization` was built for (None: not built)."""
    shape = getattr(layer, "_build_input_shape", None)
    return None if shape is None else tuple(shape)


def call_shapes(layer: keras.layers.Layer) -> List[Tuple[List[Tuple], List[Tuple]]]:
    """The shapes each symbolic call of `layer` was traced with (its graph nodes).

    Args:
      layer: A Keras layer.

    Returns:
      One (input shapes, output shapes) per node, batch axis first: the
      tensors of the call's first positional argument (a list of them for a
      merge layer; every tensor argument if the call had no positional one),
      and the call's outputs. [] for a layer never called on symbolic tensors.
    """
    shapes = []
    for node in getattr(layer, "_inbound_nodes", ()):
        arguments = node.arguments
        if arguments.args:
            tensors = [
                t for t in tree.flatten(arguments.args[0]) if isinstance(t, keras.KerasTensor)
            ]
        else:
            tensors = list(arguments.keras_tensors)
        outputs = [t for t in node.outputs if isinstance(t, keras.KerasTensor)]
        shapes.append(([tuple(t.shape) for t in tensors], [tuple(t.shape) for t in outputs]))
    return shapes


def set_random_seed_without_tensorflow(seed: int) -> None:
    """`keras.utils.set_random_seed` on the JAX backend, without importing TensorFlow.

    Keras's own also seeds TensorFlow when it is installed, which imports it
    (seconds, and its start-up log) into a JAX program that never uses it.

    Args:
      seed: The seed of Python's, NumPy's and Keras's global generators.
    """
    import random

    import numpy as np
    from keras.src.backend.common import global_state
    from keras.src.random import seed_generator
    from keras.src.utils import rng_utils

    global_state.set_global_attribute(rng_utils.GLOBAL_RANDOM_SEED, seed)
    global_state.set_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR, None)
    random.seed(seed)
    np.random.seed(seed)
