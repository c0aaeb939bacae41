"""What a model's training-mode forward pass does, found by running it once.

Three properties decide which per-example gradient routes are exact and
private, and none of them can be read off layer classes alone:

* **State updates.** A layer that writes a variable while called in training
  mode (moving statistics, counters, any `v.assign(f(x))`) stores values of
  single examples in the model's weights, unclipped and un-noised. Found by
  tracing one training-mode call in a `tf.function` and following every
  captured resource handle to the ops that use it, into the bodies of nested
  functions (`tf.cond`, `tf.while_loop`, nested `tf.function`s): any op other
  than a read, the random number ops of a `tf.random.Generator`, or an
  assignment to the state of a Keras `SeedGenerator` (which random layers
  advance by a constant), counts as a write.
* **Tied variables.** A variable read outside the calls of the layer that
  owns it (a transposed-Dense decoder reading the encoder's kernel, a custom
  layer holding another layer's kernel) gets gradient through paths that
  the ghost and layerwise rules, which look at the owning layer's calls
  only, do not see. Found in the same trace: every layer's `call` is wrapped
  to record which graph ops it created, and each use of a variable is
  attributed to the innermost layer call that created it.
* **Cross-example computation.** The layerwise route runs ONE batched pass
  over all rows, so an op that mixes rows (centering by the batch mean)
  mixes examples. It is allowed only for models built from an explicit
  allow-list of per-example layer types (exact types) whose training-mode
  outputs pass a gradient check on a small random batch (`cross_example_reason`),
  after a static check that no axis argument of an allowed layer names the
  batch axis (`batch_axis_reason`).

The trace runs once per model and is cached (the probe of the last point once
per model and number of views); nothing here runs per training step.
"""

import inspect
import weakref
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from tan_keras import _keras_internals
from tan_keras.mechanism import captures, data_copies

# Ops that use a variable's resource handle without writing it.
_READ_OPS = frozenset(
    {
        "ReadVariableOp",
        "ResourceGather",
        "ResourceGatherNd",
        "VariableShape",
        "VarIsInitializedOp",
        "DisableCopyOnRead",
        "LookupTableFindV2",
        "LookupTableSizeV2",
    }
)
# Ops of a `tf.random.Generator`: they advance its counter by the number of
# values drawn and write nothing else, so its state holds no data. (Keras
# 2.15's random preprocessing layers use one; Dropout and GaussianNoise use
# stateless or legacy stateful random ops, which own no variable.)
_RNG_OPS = frozenset(
    {
        "RngReadAndSkip",
        "RngSkip",
        "StatefulUniform",
        "StatefulUniformFullInt",
        "StatefulUniformInt",
        "StatefulStandardNormal",
        "StatefulStandardNormalV2",
        "StatefulTruncatedNormal",
        "StatefulRandomBinomial",
    }
)
# How a Keras SeedGenerator advances its state (SeedGenerator.next).
_SEED_WRITE_OPS = frozenset({"AssignVariableOp", "AssignAddVariableOp"})
_PASS_OPS = frozenset({"Identity", "IdentityN"})
# Calls whose first input is a predicate or branch index, not a function argument.
_CALLS_WITH_SELECTOR = frozenset({"If", "StatelessIf", "Case", "StatelessCase"})
_LOOPS = frozenset({"While", "StatelessWhile"})

# Layers computing each example's output from that example's rows alone,
# whatever their (non-batch-axis) configuration. Exact types: a subclass may
# override `call`. Lambda, TFOpLambda (TF ops in functional models) and
# custom layers are not on it: they may mix the rows of a batch.
_PER_EXAMPLE_LAYER_NAMES = (
    "InputLayer",
    "Dense",
    "Conv1D",
    "Conv2D",
    "Conv3D",
    "Conv1DTranspose",
    "Conv2DTranspose",
    "Conv3DTranspose",
    "DepthwiseConv1D",
    "DepthwiseConv2D",
    "SeparableConv1D",
    "SeparableConv2D",
    "Embedding",
    "GroupNormalization",
    "LayerNormalization",
    "UnitNormalization",
    "Activation",
    "ReLU",
    "LeakyReLU",
    "PReLU",
    "ELU",
    "Softmax",
    "ThresholdedReLU",
    "AveragePooling1D",
    "AveragePooling2D",
    "AveragePooling3D",
    "MaxPooling1D",
    "MaxPooling2D",
    "MaxPooling3D",
    "GlobalAveragePooling1D",
    "GlobalAveragePooling2D",
    "GlobalAveragePooling3D",
    "GlobalMaxPooling1D",
    "GlobalMaxPooling2D",
    "GlobalMaxPooling3D",
    "Flatten",
    "Reshape",
    "Permute",
    "RepeatVector",
    "Cropping1D",
    "Cropping2D",
    "Cropping3D",
    "ZeroPadding1D",
    "ZeroPadding2D",
    "ZeroPadding3D",
    "UpSampling1D",
    "UpSampling2D",
    "UpSampling3D",
    "Add",
    "Subtract",
    "Multiply",
    "Average",
    "Maximum",
    "Minimum",
    "Concatenate",
    "Dot",
    "Dropout",
    "SpatialDropout1D",
    "SpatialDropout2D",
    "SpatialDropout3D",
    "GaussianNoise",
    "GaussianDropout",
    "AlphaDropout",
    "Rescaling",
    "Identity",
)

_PROBE_EXAMPLES = 3

# Layer types added by the packages that define them (tan_keras.models).
_REGISTERED_TYPES: List[type] = []


def register_per_example_layer_type(layer_type: type) -> None:
    """Adds a layer type that never mixes the examples of a batch.

    Only for layers whose output for one example depends on that example's
    input alone, with no state written in a training call: the gradient probe
    still runs, but the allow-list is the first line of the guarantee.

    Args:
      layer_type: A `keras.layers.Layer` subclass (matched exactly).

    Raises:
      TypeError: if `layer_type` is not a Layer subclass.
    """
    if not (isinstance(layer_type, type) and issubclass(layer_type, keras.layers.Layer)):
        raise TypeError(f"layer_type must be a keras.layers.Layer subclass, got {layer_type!r}")
    if layer_type not in _REGISTERED_TYPES:
        _REGISTERED_TYPES.append(layer_type)


def per_example_layer_types() -> Tuple[type, ...]:
    """The layer types the layerwise route accepts (exact types, no subclasses).

    Returns:
      Keras layer classes, the types added by `register_per_example_layer_type`
      (the package's WSConv2D), and the functional and Sequential containers
      (their sub-layers are checked one by one).
    """
    types = [getattr(keras.layers, name, None) for name in _PER_EXAMPLE_LAYER_NAMES]
    types += [*_REGISTERED_TYPES, *_keras_internals.functional_types()]
    return tuple(t for t in types if t is not None)


# The allowed types whose `call` acts along axes named by an argument, and
# the attribute `call` reads it from (read at check time: what the next call
# uses, even if set after construction). Named as the batch axis (0, or
# -rank of the input), the layer mixes the rows of a batch, and the gradient
# probe sees that only where the layer's input varies on random data: behind
# a gate that is constant there (a ReLU with a large threshold) it sees a
# zero gradient. So the configuration is checked statically.
_AXIS_ARGUMENTS = {
    "Softmax": "axis",
    "LayerNormalization": "axis",
    "UnitNormalization": "axis",
    "GroupNormalization": "axis",
    "Concatenate": "axis",
    "Dot": "axes",
    "Permute": "dims",
}
# The other allowed types, each read for an argument that could name the
# batch axis: none can. Dense, Embedding, RepeatVector act on the last axis
# or add one after the batch axis; convolutions, pooling, global pooling,
# cropping, padding, upsampling and Flatten take a `data_format`, which
# places the channels among the non-batch axes (axis 0 is the batch in
# both); Reshape's `target_shape` excludes the batch axis; the elementwise
# merges and activations have no axis (an `activation` argument, on any
# layer, is checked: a built-in Keras activation, its own default axis
# normalised like the arguments above); PReLU's `shared_axes` only shapes its
# weight, which spans the non-batch axes; Dropout's and AlphaDropout's
# `noise_shape` only shares random draws, it carries no data between rows;
# Rescaling's `scale` and `offset` broadcast against the input and are
# checked not to reach its batch axis.


def _builtin_activations() -> Dict[int, object]:
    return {
        id(function): function
        for name in dir(keras.activations)
        if not name.startswith("_") and name not in ("get", "serialize", "deserialize")
        for function in [getattr(keras.activations, name)]
        if callable(function)
    }


def _axis_list(value) -> Optional[List[int]]:
    """The axes an axis argument names (None: every axis); ValueError if not integers."""
    if value is None:
        return None
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values
    ):
        raise ValueError(value)
    return [int(v) for v in values]


def _names_batch_axis(axes: Optional[List[int]], rank: int) -> bool:
    """Whether `axes` of an input of `rank` include the batch axis (ValueError: out of range)."""
    if axes is None:
        return True
    for axis in axes:
        if not -rank <= axis < rank:
            raise ValueError(axis)
        if axis % rank == 0:
            return True
    return False


def batch_axis_reason(layer: keras.layers.Layer) -> Optional[str]:
    """Why `layer`'s configuration may act over the batch axis, or None.

    A static check of every argument of an allowed layer type that names
    axes (`axis` of Softmax, LayerNormalization, UnitNormalization,
    GroupNormalization and Concatenate; `axes` of Dot; `dims` of Permute),
    normalised against the rank of the layer's input in each of its calls
    (axis -rank is the batch axis); of any `activation` argument (a built-in
    Keras activation, whose default axis is normalised the same way against
    the output); and of Rescaling's `scale` and `offset` (they must not
    broadcast onto the batch axis). The gradient probe of
    `cross_example_reason` cannot see a configuration that mixes rows behind
    a gate constant on random data; this check does not depend on the data.

    Args:
      layer: A layer of an allowed type (`per_example_layer_types()`).

    Returns:
      None, or a sentence naming the layer, the argument and its value; an
      argument that cannot be checked (not integers, out of range, or a
      layer never called on symbolic inputs, so the rank is unknown) is a
      reason too.
    """
    label = f"layer `{layer.name}` ({type(layer).__name__})"
    calls = _keras_internals.call_shapes(layer)
    attribute = _AXIS_ARGUMENTS.get(type(layer).__name__)
    if attribute is not None and type(layer) is getattr(keras.layers, type(layer).__name__, None):
        value = getattr(layer, attribute, None)
        unknown = (
            f"{label} has {attribute}={value!r}, which cannot be checked against the batch "
            "axis (expected integers within the rank of each input the layer was called on)"
        )
        if not calls or not all(inputs for inputs, _ in calls):
            return (
                f"{label}: the rank of its input is unknown (it was never called on symbolic "
                f"inputs), so its {attribute}={value!r} cannot be checked against the batch axis"
            )
        try:
            if attribute == "axes" and isinstance(value, (list, tuple)):
                # Dot: one axis per input.
                per_input = [[a] for a in _axis_list(value)]
            else:
                per_input = None
                axes = _axis_list(value)
            for inputs, _ in calls:
                for position, shape in enumerate(inputs):
                    if per_input is not None:
                        if position >= len(per_input):
                            raise ValueError(value)
                        axes = per_input[position]
                    # (Permute transposes its input by (0,) + dims: a dim
                    # naming axis 0 moves the batch axis.)
                    if _names_batch_axis(axes, len(shape)):
                        every = " (every axis)" if value is None else ""
                        return (
                            f"{label} has {attribute}={value!r}{every}, which on its rank-"
                            f"{len(shape)} input {shape} includes the batch axis (axis 0, or "
                            f"-{len(shape)}): the layer then acts across the examples of a batch"
                        )
        except ValueError:
            return unknown
    activation = getattr(layer, "activation", None)
    if activation is not None:
        builtins = _builtin_activations()
        if id(activation) not in builtins:
            return (
                f"{label} has activation={activation!r}, which is not a built-in Keras "
                "activation (a custom activation may mix the rows of a batch)"
            )
        axis = _default_axis(activation)
        if axis is not _NO_AXIS:
            name = getattr(activation, "__name__", repr(activation))
            if not calls:
                return (
                    f"{label}: the rank of its output is unknown (it was never called on "
                    f"symbolic inputs), so its activation={name!r} (along axis={axis!r}) "
                    "cannot be checked against the batch axis"
                )
            try:
                for _, outputs in calls:
                    for shape in outputs:
                        if _names_batch_axis(_axis_list(axis), len(shape)):
                            return (
                                f"{label} has activation={name!r}, which acts along "
                                f"axis={axis!r}, the batch axis of its rank-{len(shape)} "
                                f"output {shape}: it then acts across the examples of a batch"
                            )
            except ValueError:
                return (
                    f"{label} has activation={name!r}, whose axis={axis!r} cannot be checked "
                    "against the batch axis"
                )
    if type(layer) is keras.layers.Rescaling:
        for name in ("scale", "offset"):
            value = getattr(layer, name)
            rank = np.ndim(value)
            if rank and keras.config.image_data_format() == "channels_first":
                rank = max(rank, 3)  # Rescaling reshapes it to (C, 1, 1)
            for inputs, _ in calls:
                for shape in inputs:
                    if rank >= len(shape):
                        return (
                            f"{label} has a {name} of rank {rank}, which reaches the batch "
                            f"axis of its rank-{len(shape)} input {shape} when broadcast "
                            f"(expected rank below {len(shape)})"
                        )
            if rank and not calls:
                return (
                    f"{label}: the rank of its input is unknown (it was never called on "
                    f"symbolic inputs), so its {name} of rank {rank} cannot be checked "
                    "against the batch axis"
                )
    return None


_NO_AXIS = object()


def _default_axis(function):
    """The default `axis` of a built-in activation (softmax, glu, ...), or _NO_AXIS."""
    try:
        parameter = inspect.signature(function).parameters.get("axis")
    except (TypeError, ValueError):
        return None  # unknown: checked as "every axis"
    return _NO_AXIS if parameter is None else parameter.default


# Both records hold names, not layers: the cache must not keep a model alive.
class VariableWrite(NamedTuple):
    """A write to a variable (or other resource) in a training-mode call.

    Attributes:
      layer: Name of the innermost layer whose call made the write (None:
        outside every layer call).
      layer_type: Its class name (None with `layer`).
      resource: The variable's name, or the traced placeholder's name for a
        resource that is no known variable.
      op_type: The writing op, e.g. "AssignVariableOp".
    """

    layer: Optional[str]
    layer_type: Optional[str]
    resource: str
    op_type: str


class VariableTie(NamedTuple):
    """A variable used outside the calls of its (single) owning layer.

    Attributes:
      variable: The variable's name.
      owners: Names of the layers that list it among their own weights.
      readers: Names of the other layers whose calls use it (None: outside
        every layer call, or a read the trace could not map to a variable).
    """

    variable: str
    owners: Tuple[str, ...]
    readers: Tuple[Optional[str], ...]

    def describe(self) -> str:
        owners = ", ".join(f"`{name}`" for name in self.owners)
        readers = ", ".join(
            "code outside its layer's calls" if name is None else f"layer `{name}`"
            for name in self.readers
        )
        text = f"variable `{self.variable}` (weight of layer {owners})"
        if len(self.owners) > 1:
            text += " is held by several layers"
        if readers:
            text += f" is also used by {readers}"
        return text + " (tied weights)"


class _Analysis:
    """The cached results for one model, in one state of its layers' `trainable` flags."""

    def __init__(self, signature=None):
        self.signature = signature
        self.writes: Optional[Tuple[VariableWrite, ...]] = None
        self.ties: Optional[Dict[int, VariableTie]] = None
        self.loss_layers: Tuple[str, ...] = ()
        self.op_types: frozenset = frozenset()
        self.probe: Dict[int, Optional[str]] = {}


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _trainable_flags(model) -> tuple:
    # What a training-mode call does depends on them: a BatchNormalization
    # frozen runs in inference mode, unfrozen (keras.io's fine-tuning) it
    # writes its moving statistics (review round 9: traced once, the unfrozen
    # layer's writes went unseen and moved an update 258x the bound).
    return tuple(bool(layer.trainable) for layer in model._flatten_layers(include_self=True))


def _analysis(model) -> _Analysis:
    signature = _trainable_flags(model)
    entry = _CACHE.get(model)
    if entry is None or entry.signature != signature:
        entry = _CACHE[model] = _Analysis(signature)
    if entry.writes is None:
        entry.writes, entry.ties, entry.loss_layers, entry.op_types = _trace(model)
    return entry


def state_updates(model: keras.Model) -> Tuple[VariableWrite, ...]:
    """Every variable write of one training-mode call of `model` (traced once).

    Args:
      model: A built Keras model with known inputs.

    Returns:
      The writes, in graph order; empty for a model without state updates.
    """
    return _analysis(model).writes


def call_loss_layers(model: keras.Model) -> Tuple[str, ...]:
    """Layers that call `add_loss` in a training-mode call of `model`.

    Args:
      model: A built Keras model with known inputs.

    Returns:
      Their names (traced once, with `state_updates`); empty for most models.
    """
    return _analysis(model).loss_layers


def op_types(model: keras.Model) -> frozenset:
    """The TensorFlow op types of one training-mode call of `model`.

    Args:
      model: A built Keras model with known inputs.

    Returns:
      The op types of the traced call, those of nested function bodies
      (conditionals, loops) included (traced once, with `state_updates`).
    """
    return _analysis(model).op_types


def tied_variables(model: keras.Model) -> Dict[int, VariableTie]:
    """Variables of `model` used outside the calls of their owning layer.

    Args:
      model: A built Keras model with known inputs.

    Returns:
      {id(variable): VariableTie}; a layer called several times on its own
      weights (a shared layer) is not a tie.
    """
    return _analysis(model).ties


def held_values(model: keras.Model) -> List[Tuple[str, np.ndarray]]:
    """The numeric values one training-mode call of `model` holds (traced anew).

    Constants and captured tensors, whatever reference led the trace to them,
    and the variables it reads (`data_copies.graph_values`). Traced at every
    call, not cached: a layer adapted since reads other values.

    Args:
      model: A built Keras model with known inputs.

    Returns:
      (name, array) pairs.
    """
    traced = tf.function(lambda x: model(x, training=True))
    graph = traced.get_concrete_function(_input_spec(model)).graph
    return data_copies.graph_values(graph)


def _input_spec(model):
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise ValueError(
            f"Invalid value for `model`: expected a Keras model with known inputs "
            f"(functional or Sequential with an Input). Received: model={model.name!r}"
        )
    if len(inputs) == 1:
        return tf.TensorSpec(inputs[0].shape, inputs[0].dtype)
    # The structure the model was built with (a list or dict of inputs).
    return tf.nest.map_structure(
        lambda t: tf.TensorSpec(t.shape, t.dtype), _keras_internals.inputs_structure(model)
    )


def _trace(
    model,
) -> Tuple[Tuple[VariableWrite, ...], Dict[int, VariableTie], Tuple[str, ...], frozenset]:
    layers = _keras_internals.all_layers(model, include_self=True)
    calls: List[Tuple[tf.Graph, int, int, int]] = []
    patched = []
    for index, layer in enumerate(layers):
        had_own = "call" in layer.__dict__
        original = layer.call

        def call(*args, _index=index, _original=original, **kwargs):
            graph = tf.compat.v1.get_default_graph()
            start = len(graph.get_operations())
            try:
                return _original(*args, **kwargs)
            finally:
                calls.append((graph, start, len(graph.get_operations()), _index))

        layer.call = call
        patched.append((layer, original, had_own))
    loss_layers: List[str] = []

    def training_call(x):
        out = model(x, training=True)
        loss_layers[:] = [layer.name for layer in layers if _keras_internals.call_losses(layer)]
        return out

    try:
        traced = tf.function(training_call)
        graph = traced.get_concrete_function(_input_spec(model)).graph
    finally:
        for layer, original, had_own in reversed(patched):
            if had_own:
                layer.call = original
            else:
                delattr(layer, "call")
    operations = graph.get_operations()
    # The innermost layer call that created each op of the traced graph
    # (outer calls first, inner ones overwrite; an inner call ends, and so is
    # recorded, before an outer call of the same extent). Ops of nested
    # function bodies count for the op that calls them.
    creator = [None] * len(operations)
    own = [(order, c) for order, c in enumerate(calls) if c[0] is graph]
    for _, (_, start, end, index) in sorted(own, key=lambda p: (p[1][1] - p[1][2], -p[0])):
        creator[start:end] = [index] * (end - start)
    op_index = {op.name: i for i, op in enumerate(operations)}

    known = list(model.variables) + list(graph.variables)
    by_handle = {}
    for variable in known:
        for handle in _handles(variable):
            by_handle.setdefault(id(handle), variable)
    # A seed state is exempt only when written by the Keras random layer that
    # holds it (Keras's own code advances it by a constant); any other
    # writer, e.g. a custom layer assigning data into it, is a write.
    seed_owner = {
        id(state): layer
        for layer in layers
        if type(layer).__module__.startswith("keras.")
        for state in _keras_internals.seed_generator_states(layer)
    }
    uses = _resource_uses(graph)
    writes, readers = [], {}
    unidentified = False  # a resource read that maps to no known variable
    for external, internal in graph.captures:
        if internal.dtype != tf.resource:
            continue
        variable = by_handle.get(id(external))
        for node, op_type, kind in uses.get(internal.op.name, ()):
            index = creator[op_index[node]] if node in op_index else None
            layer = None if index is None else layers[index]
            if (
                kind == "write"
                and op_type in _SEED_WRITE_OPS
                and layer is not None
                and seed_owner.get(id(variable)) is layer
            ):
                kind = "rng"
            if kind == "write":
                resource = _name(variable) if variable is not None else internal.op.name
                writes.append(
                    VariableWrite(
                        None if layer is None else layer.name,
                        None if layer is None else type(layer).__name__,
                        resource,
                        op_type,
                    )
                )
            elif variable is not None:
                readers.setdefault(id(variable), []).append(layer)
            elif kind == "read":
                unidentified = True
    types = graph_op_types(graph)
    return tuple(writes), _ties(layers, readers, unidentified), tuple(loss_layers), types


# Ops that run Python code: no trace sees the state that code keeps.
PYTHON_OPS = frozenset({"EagerPyFunc", "PyFunc", "PyFuncStateless"})
# Ops that write tensors out of the traced code, to the console or a summary
# file: in training code they would publish examples' values (and which
# examples a secret Poisson step drew) outside the noisy update.
OUTPUT_OPS = frozenset(
    {
        "Print",
        "PrintV2",
        "WriteAudioSummary",
        "WriteGraphSummary",
        "WriteHistogramSummary",
        "WriteImageSummary",
        "WriteRawProtoSummary",
        "WriteScalarSummary",
        "WriteSummary",
    }
)


def output_refusal(where: str, op_type: str) -> str:
    """The sentence refusing `where` (e.g. "The model's training call") for an output op."""
    return (
        f"{where} writes tensors out of the training step through a {op_type} op "
        "(tf.print, tf.summary). Run on the training examples, it would publish their "
        "values (and which examples each secret Poisson step drew) outside the noisy "
        "update. Remove it (debug the same code with plain Keras on public data)."
    )


def function_writes(
    function,
    *specs,
    autograph: bool = False,
    allowed: Optional[Callable[[], Iterable]] = None,
    python: bool = True,
    seed_states: bool = True,
) -> Tuple[str, ...]:
    """What `function`, traced on `specs`, keeps between calls, other than random state.

    Random state is what Keras's own random layers reachable from `function`
    advance (their `SeedGenerator`s) and `tf.random.Generator` counters
    advanced by amounts fixed when traced: writes that hold no data.

    Args:
      function: A function of tensors (an augmenter, a loss).
      *specs: `tf.TensorSpec` structures of its arguments.
      autograph: Whether to convert Python control flow on tensors, as Keras
        does for a loss called inside its train step.
      allowed: None, or a function returning the variables whose writes are
        expected (the metrics' own, for a metrics update). Called after the
        trace, so that variables the traced code creates on its first call
        (a metric built lazily) are among them.
      python: Whether calls into Python are reported (for code whose state
        nothing that trains can read: training code may not call Python).
      seed_states: Whether writes to the seed states of the Keras random
        layers reachable from `function` are exempt (an augmenter's random
        draws); False for code that has no draws to make (a metrics update).

    Returns:
      Sentences completing "one that ...": each variable it writes, and any
      call into Python (`tf.py_function`, `tf.numpy_function`), whose state
      no trace can see; empty for a function without state.
    """
    exempt = set()
    for layer in captures.reachable_layers(function) if seed_states else ():
        if type(layer).__module__.startswith("keras."):
            for state in _keras_internals.seed_generator_states(layer):
                exempt.update(id(handle) for handle in _handles(state))
    graph = tf.function(function, autograph=autograph).get_concrete_function(*specs).graph
    for variable in allowed() if allowed is not None else ():
        exempt.update(id(handle) for handle in _handles(variable))
    uses = _resource_uses(graph)
    names = {id(h): _name(v) for v in graph.variables for h in _handles(v)}
    written = []
    for external, internal in graph.captures:
        if internal.dtype != tf.resource or id(external) in exempt:
            continue
        if any(kind == "write" for _, _, kind in uses.get(internal.op.name, ())):
            written.append(f"writes the variable `{names.get(id(external), internal.op.name)}`")
    op_types = graph_op_types(graph)
    calls = sorted(PYTHON_OPS & op_types) if python else []
    if calls:
        written.append(
            f"calls Python code through a {calls[0]} op (tf.py_function or "
            "tf.numpy_function), whose state no trace can see"
        )
    outputs = sorted(OUTPUT_OPS & op_types)
    if outputs:
        written.append(
            f"writes tensors out of the step through a {outputs[0]} op (tf.print, "
            "tf.summary), publishing training values outside the noisy update"
        )
    return tuple(written)


def captured_handles(graph) -> frozenset:
    """The ids of the resource handles `graph` has captured so far.

    In a graph being traced (a train step), the variables what was traced so
    far reads or writes, nested function bodies included (their captures
    are captured by the graph that calls them).

    Args:
      graph: A `FuncGraph`.

    Returns:
      `id`s of the captured handles (compare with `local_handle_id`).
    """
    return frozenset(
        id(external) for external, internal in graph.captures if internal.dtype == tf.resource
    )


def local_handle_id(variable) -> int:
    """The id of the handle through which code traced here reads `variable`.

    Its own handle; under a distribution strategy, in replica context, the
    current replica's component (or the packed handle): the replicas trace
    into one graph, and another replica's capture of its own component says
    nothing of this replica's reads.

    Args:
      variable: A Keras or TensorFlow variable, distributed or not.

    Returns:
      The `id` of the handle (compare with `captured_handles`).
    """
    if isinstance(variable, keras.Variable):
        variable = variable.value
    return id(variable.handle)


def graph_op_types(graph) -> frozenset:
    """The op types of `graph`, those of the function bodies it calls included."""
    definition = graph.as_graph_def()
    types = {node.op for node in definition.node}
    for function in definition.library.function:
        types.update(node.op for node in function.node_def)
    return frozenset(types)


def _name(variable) -> str:
    # A Keras variable's path names its layer ("dense/kernel").
    return getattr(variable, "path", None) or variable.name


def _handles(variable) -> List[tf.Tensor]:
    """The resource handles a traced read of `variable` may capture.

    A Keras variable is read through the TensorFlow variable it wraps; a
    distributed variable (MirroredStrategy) through one of its per-device
    components, or a packed handle, not through a handle of its own.
    """
    if isinstance(variable, keras.Variable):
        variable = variable.value
    holders = [variable]
    try:
        holders += list(getattr(variable, "values", None) or ())
    except (TypeError, ValueError):
        pass
    packed = getattr(variable, "_packed_var", None)
    if packed is not None:
        holders.append(packed)
    handles = []
    for holder in holders:
        try:
            handles.append(holder.handle)
        except (AttributeError, ValueError, RuntimeError):
            continue
    return handles


def _ties(layers, readers, unidentified: bool) -> Dict[int, VariableTie]:
    owners: Dict[int, list] = {}
    variables = {}
    for layer in layers:
        for variable in _keras_internals.own_variables(layer):
            held = owners.setdefault(id(variable), [])
            if all(layer is not other for other in held):
                held.append(layer)
            variables[id(variable)] = variable
    ties = {}
    for key, held in owners.items():
        others = []
        for layer in readers.get(key, ()):
            if all(layer is not owner for owner in held) and all(
                layer is not other for other in others
            ):
                others.append(layer)
        if key not in readers and unidentified:
            # Fail safe: if some read could not be mapped to its variable, a
            # weight seen unread may be read there, by anyone.
            others = [None]
        if len(held) > 1 or others:
            ties[key] = VariableTie(
                _name(variables[key]),
                tuple(layer.name for layer in held),
                tuple(None if layer is None else layer.name for layer in others),
            )
    return ties


def _inputs_of(node) -> List[Tuple[int, str]]:
    return [(i, name) for i, name in enumerate(node.input) if not name.startswith("^")]


def _graph_key(name: str) -> str:
    """Names a tensor of the outer GraphDef as "op:k" ("op" means "op:0")."""
    return name if ":" in name else name + ":0"


def _resource_uses(graph) -> Dict[str, List[Tuple[str, str, str]]]:
    """For each resource placeholder of `graph`: (outer op, op type, kind) of its uses.

    kind is "read", "rng" or "write"; uses inside a nested function body are
    reported with the outer op that calls the function.
    """
    graph_def = graph.as_graph_def()
    library = {f.signature.name: f for f in graph_def.library.function}
    outer = _Scope(graph_def.node, outer=True)
    scopes = {name: _Scope(f.node_def, outer=False) for name, f in library.items()}
    result = {}
    for node in graph_def.node:
        if node.op != "Placeholder" or node.attr["dtype"].type != tf.resource.as_datatype_enum:
            continue
        found = []
        _follow(outer, node.name + ":0", None, library, scopes, found, set())
        result[node.name] = found
    return result


class _Scope:
    """The consumers of every tensor of a graph or function body."""

    def __init__(self, nodes, outer: bool):
        self.outer = outer
        self.consumers: Dict[str, List[Tuple[object, int]]] = {}
        self.nodes = {node.name: node for node in nodes}
        for node in nodes:
            for position, name in _inputs_of(node):
                key = _graph_key(name) if outer else name
                self.consumers.setdefault(key, []).append((node, position))

    def output(self, node, index: int) -> str:
        return f"{node.name}:{index}" if self.outer else f"{node.name}:output:{index}"

    def constant(self, name: str, depth: int = 0) -> bool:
        """Whether the tensor `name` is computed from constants only (no data, no state)."""
        node = self.nodes.get(name.lstrip("^").split(":")[0])
        if node is None or depth > 64:
            return False  # a function argument: data, as far as this scope knows
        if node.op == "Const":
            return True
        if node.op in ("Placeholder", "ReadVariableOp") or not node.input:
            return False
        return all(
            self.constant(source, depth + 1) for source in node.input if not source.startswith("^")
        )


def _called_functions(node, library) -> List[str]:
    names = []
    if node.op in library:
        names.append(node.op)
    for value in node.attr.values():
        if value.HasField("func") and value.func.name in library:
            names.append(value.func.name)
        names += [f.name for f in value.list.func if f.name in library]
    return names


def _follow(scope, key, caller, library, scopes, found, seen, guarded=False):
    """Appends the uses of the resource tensor `key` of `scope` to `found`.

    `guarded`: whether `scope` runs under a conditional or a loop, where
    the data may decide how often a random generator advances.
    """
    if (id(scope), key) in seen:
        return
    seen.add((id(scope), key))
    for node, position in scope.consumers.get(key, ()):
        site = caller if caller is not None else node.name
        if node.op in _PASS_OPS:
            out = 0 if node.op == "Identity" else position
            _follow(scope, scope.output(node, out), caller, library, scopes, found, seen, guarded)
            continue
        if node.op in _READ_OPS:
            found.append((site, node.op, "read"))
            continue
        if node.op in _RNG_OPS:
            # A generator holds no data only if it advances by amounts fixed
            # when traced: a skip or a shape computed from the data, or a draw
            # the data decides to make, writes the data into its counter.
            fixed = not guarded and all(
                scope.constant(name) for at, name in _inputs_of(node) if at != position
            )
            found.append((site, node.op, "rng" if fixed else "write"))
            continue
        functions = _called_functions(node, library)
        if not functions:
            found.append((site, node.op, "write"))
            continue
        inner_guarded = guarded or node.op in _CALLS_WITH_SELECTOR or node.op in _LOOPS
        argument = position - (1 if node.op in _CALLS_WITH_SELECTOR else 0)
        for name in functions:
            args = library[name].signature.input_arg
            if 0 <= argument < len(args):
                _follow(
                    scopes[name],
                    args[argument].name,
                    site,
                    library,
                    scopes,
                    found,
                    seen,
                    inner_guarded,
                )
        if node.op in _LOOPS:
            # A loop passes its variables through: output i is input i.
            _follow(
                scope, scope.output(node, position), caller, library, scopes, found, seen, guarded
            )


def cross_example_reason(model: keras.Model, augmult: int = 1) -> Optional[str]:
    """Why one batched pass over `model` may mix examples, or None if it may not.

    The layerwise route runs all B * K rows through the model at once, so
    each example's rows must not influence another example's outputs. Two
    checks, both needed: every layer (recursively) is of a type in
    `per_example_layer_types()`, and every operation of a functional graph
    is such a layer, not a `keras.ops` call (a gradient check cannot see a
    mixing hidden behind `stop_gradient`); and in one training-mode call on 3 random
    examples of K views each (rows ordered as the layerwise route orders
    them), the gradients of the first and of the last example's outputs with
    respect to the other examples' input rows are exactly zero. Allowed
    layers configured to act over the batch axis (`Softmax(axis=0)`,
    `Concatenate(axis=-2)` on rank-2 inputs) are refused first by a static
    check of their configuration (`batch_axis_reason`), which holds whatever
    the data: the probe only sees a mixing where the model's gradient on its
    random batch is nonzero, not behind a gate that is constant there. The
    probe stays as a second line. A single call, so random layers (Dropout)
    draw one mask.

    Args:
      model: A built Keras model.
      augmult: K, the views per example.

    Returns:
      None, or a sentence naming the layer or the check that failed.
    """
    allowed = per_example_layer_types()
    for layer in _keras_internals.all_layers(model, include_self=True):
        for operation in _keras_internals.graph_operations(layer):
            if not isinstance(operation, keras.layers.Layer):
                return (
                    f"operation `{operation.name}` ({type(operation).__name__}) of the "
                    "functional graph is not a layer of a type known to compute each "
                    "example's output from that example's rows alone (`keras.ops` "
                    "calls between layers may mix the rows of a batch, e.g. centering "
                    "by the batch mean)"
                )
        if layer is not model and type(layer) not in allowed:
            return (
                f"layer `{layer.name}` ({type(layer).__name__}) is not one of the layer types "
                "known to compute each example's output from that example's rows alone "
                "(Lambda layers, `keras.ops` in functional models and custom layers may "
                "mix the rows of a batch, e.g. centering by the batch mean)"
            )
        if layer is not model:
            configured = batch_axis_reason(layer)
            if configured is not None:
                return configured
    entry = _CACHE.get(model)
    if entry is None:
        entry = _CACHE[model] = _Analysis()
    if augmult not in entry.probe:
        entry.probe[augmult] = _probe(model, augmult)
    return entry.probe[augmult]


def _probe(model, views: int) -> Optional[str]:
    inputs = getattr(model, "inputs", None) or []
    if not inputs:
        return "the cross-example check needs a model with known inputs"
    for tensor in inputs:
        shape, dtype = tuple(tensor.shape[1:]), tf.as_dtype(tensor.dtype)
        if None in shape or not dtype.is_floating:
            return (
                "the cross-example check needs static, floating-point input shapes "
                f"(got {dtype.name} {shape} for input `{tensor.name}`)"
            )
    rows = _PROBE_EXAMPLES * views
    rng = np.random.default_rng(0)
    structure = inputs[0] if len(inputs) == 1 else _keras_internals.inputs_structure(model)
    x = tf.nest.map_structure(
        lambda t: tf.constant(rng.normal(size=(rows,) + tuple(t.shape[1:])), t.dtype), structure
    )
    flat_x = tf.nest.flatten(x)
    examples = (0, _PROBE_EXAMPLES - 1)
    try:
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(flat_x)
            outputs = tf.nest.flatten(model(x, training=True))
            for out in outputs:
                if out.shape.rank == 0 or out.shape[0] != rows:
                    return (
                        f"a training-mode call on {rows} rows returned an output of shape "
                        f"{out.shape}: the model changes the number of rows"
                    )
            # A random projection of the first and of the last example's outputs.
            targets = [
                tf.add_n(
                    [
                        tf.reduce_sum(
                            tf.cast(out[e * views : (e + 1) * views], tf.float32)
                            * _weights(rng, [views] + list(out.shape[1:]))
                        )
                        for out in outputs
                    ]
                )
                for e in examples
            ]
        for example, target in zip(examples, targets):
            own = slice(example * views, (example + 1) * views)
            leaks = False
            for grad in tape.gradient(target, flat_x):
                if grad is None:
                    continue
                others = tf.concat([grad[: own.start], grad[own.stop :]], axis=0)
                leaks = leaks or bool(tf.reduce_any(others != 0))
            if leaks:
                return (
                    "in a training-mode call, the outputs of one example depend on the "
                    "inputs of other examples (nonzero gradient across examples on a "
                    f"random batch of {_PROBE_EXAMPLES} examples x {views} view(s)); look "
                    "for a layer that reduces over the batch axis, e.g. Softmax(axis=0) "
                    "or LayerNormalization(axis=0)"
                )
    except (ValueError, TypeError, tf.errors.OpError) as err:
        return f"the cross-example check could not run ({type(err).__name__}: {err})"
    return None


def _weights(rng, shape: Sequence[int]) -> tf.Tensor:
    return tf.constant(rng.normal(size=tuple(shape)), tf.float32)
