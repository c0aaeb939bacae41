"""One policy for out-of-range ids into Embedding and CategoryEncoding layers.

What Keras 3.15 does on the TensorFlow backend with an id (checked in
`keras/src/layers/core/embedding.py` and `backend/tensorflow/numpy.py`):
`Embedding.call` casts ids that are not int32/int64 to int32 (a float 2.7
becomes 2), and `ops.take` reads an id in [-input_dim, 0) as row
id + input_dim; any other id makes `tf.gather` fail on CPU, at whichever step
first samples the example, with a message that PRINTS the id (a private
value), while XLA clamps it and a GPU reads zeros. `CategoryEncoding`
(`num_tokens`) has no such wrap: a negative id fails (its bincount) and an id
>= num_tokens is silently ignored.

tan_keras treats such an example like one with an invalid label
(`labels.py`): on every route, with and without XLA, it is dropped from the
step (mask 0, so it contributes exactly 0), the model inputs its ids are
computed from are replaced by zeros in its row (so nothing fails), and it
is counted in the `nonfinite_examples` metric. Valid means integral (a
fraction would be truncated silently) and in [-input_dim, input_dim) for an
Embedding (the ids Keras reads, as `ghost._token_ids` does), in
[0, num_tokens) for a CategoryEncoding. No id value reaches any message.

How the ids are found. The model's functional graph (nested functional and
Sequential models included) names the tensor each Embedding reads. When it
is a model input, it is checked as it is. When earlier layers compute it (a
cast, an IntegerLookup, a custom layer), that part of the graph, and only
that part, is run again on the micro-batch before the step, without
gradients: batched when every layer on it is a Keras layer that maps each
row by itself with fixed tables, else one example at a time with
`tf.vectorized_map`, as the per-example routes run the model (so one
example's ids never depend on another's rows). An Embedding called inside a
layer that no graph describes (a custom layer's or a subclassed model's
`call`) is checked by running that layer again, in inference mode, with
its Embeddings' calls checked (one more forward pass of that layer, without
gradients). A random layer of the graph on the path to the ids (the ids
checked would not be those the step reads) is refused, and so is a model
whose all-zero input gives invalid ids itself (a dropped example's
replacement would fail).

Lookup layers (`IntegerLookup`, `StringLookup`) with `num_oov_indices=0`
fail on any value outside their vocabulary, with a message that prints the
value. They are refused when the model is built rather than filtered: an
example can only be dropped after testing each of its values against the
vocabulary, a second lookup outside the layer, where `num_oov_indices=1`
(the Keras default) maps unknown values to an index the model learns
instead, without losing the example.
"""

from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import keras
import tensorflow as tf

from tan_keras import _keras_internals

# Exact types that map each row to a row with fixed tables and no weights:
# a path made only of them runs on the whole micro-batch at once.
_ROW_WISE = (
    keras.layers.InputLayer,
    keras.layers.IntegerLookup,
    keras.layers.StringLookup,
    keras.layers.Hashing,
    keras.layers.Discretization,
    keras.layers.Reshape,
    keras.layers.Flatten,
    keras.layers.Identity,
)


def id_range(layer: Any) -> Optional[Tuple[int, int]]:
    """[low, high) of the ids `layer` reads, or None for a layer that reads none.

    Args:
      layer: Any layer or graph operation.

    Returns:
      (-input_dim, input_dim) for an Embedding (Keras reads a negative id as
      id + input_dim), (0, num_tokens) for a CategoryEncoding, else None.
    """
    if isinstance(layer, keras.layers.Embedding):
        return (-int(layer.input_dim), int(layer.input_dim))
    if isinstance(layer, keras.layers.CategoryEncoding) and layer.num_tokens is not None:
        return (0, int(layer.num_tokens))
    return None


def valid_ids(ids: tf.Tensor, low: int, high: int) -> tf.Tensor:
    """[rows] bool: whether every id of each row (axis 0) is integral and in [low, high).

    Args:
      ids: [rows, ...] ids, integer or floating (NaN and infinities are invalid).
      low: The smallest valid id.
      high: One above the largest valid id.

    Returns:
      A bool tensor with one entry per row.
    """
    ids = tf.convert_to_tensor(ids)
    if ids.dtype.is_floating:
        if ids.dtype != tf.float64:
            ids = tf.cast(ids, tf.float32)
        # Every comparison with NaN is False: a NaN id is invalid.
        ok = tf.logical_and(ids >= low, ids < high)
        ok = tf.logical_and(ok, tf.equal(ids, tf.floor(ids)))
    else:
        wide = tf.cast(ids, tf.int64)
        ok = tf.logical_and(wide >= low, wide < high)
    if ok.shape.rank == 0:
        return tf.reshape(ok, [1])
    return tf.reduce_all(tf.reshape(ok, [tf.shape(ok)[0], -1]), axis=1)


def check_lookups(model: keras.Model) -> None:
    """Refuses lookup layers that fail on a value outside their vocabulary.

    Args:
      model: The model to train privately.

    Raises:
      ValueError: naming the first `IntegerLookup` or `StringLookup` with
        `num_oov_indices=0` (see the module docstring for why it is refused).
    """
    for layer in _keras_internals.all_layers(model):
        lookup = isinstance(layer, (keras.layers.IntegerLookup, keras.layers.StringLookup))
        if lookup and layer.num_oov_indices == 0 and not layer.invert:
            raise ValueError(
                f"Invalid value for `num_oov_indices` of layer `{layer.name}` "
                f"({type(layer).__name__}): expected an integer >= 1 for a model trained "
                "privately. Received: num_oov_indices=0. With 0, a value outside the "
                "vocabulary stops training at whichever step first samples its example, "
                "with an error that prints the value (a private one). Use num_oov_indices "
                ">= 1 (unknown values map to an out-of-vocabulary index), or map values "
                "outside the vocabulary in the input pipeline."
            )


class _Step(NamedTuple):
    """One node of a graph to run (or check) on the way to the ids."""

    node: Any
    kind: str  # "check" (an id layer), "run", "nested" (a graph), "opaque"
    outputs_needed: bool
    bounds: Optional[Tuple[int, int]] = None
    inner: Optional["_Plan"] = None


class _Plan(NamedTuple):
    """What to run of one functional graph: its steps, the inputs they read."""

    steps: Tuple[_Step, ...]
    inputs: Tuple[Any, ...]  # the graph inputs read (symbolic), graph order
    all_inputs: Tuple[Any, ...]  # every graph input, in graph order
    wanted: Tuple[Any, ...]  # graph tensors returned (for a nested graph's outputs)


def _id_layers(layer) -> List[Any]:
    if not isinstance(layer, keras.layers.Layer):
        return []
    return [
        inner
        for inner in _keras_internals.all_layers(layer, include_self=True)
        if id_range(inner) is not None
    ]


def _is_random(operation) -> bool:
    if not isinstance(operation, keras.layers.Layer):
        return False
    layers = _keras_internals.all_layers(operation, include_self=True)
    return any(_keras_internals.seed_generator_states(layer) for layer in layers)


def _plan(graph, wanted) -> _Plan:
    """The steps of `graph` that produce `wanted` and check every id read in it."""
    needed = {id(t) for t in wanted}
    steps = []
    for node in reversed(_keras_internals.graph_nodes(graph)):
        if node.is_input:
            continue
        operation = node.operation
        outputs_needed = any(id(t) in needed for t in node.outputs)
        bounds = id_range(operation)
        if bounds is not None:
            step = _Step(node, "check", outputs_needed, bounds=bounds)
        elif _id_layers(operation):
            inner_graph = _keras_internals.functional_graph(operation)
            if inner_graph is None:
                step = _Step(node, "opaque", outputs_needed)
            else:
                inner = _plan(inner_graph, inner_graph.outputs if outputs_needed else ())
                step = _Step(node, "nested", outputs_needed, inner=inner)
        elif outputs_needed:
            step = _Step(node, "run", True)
        else:
            continue
        # Inside a custom layer the path to the ids is unknown: it runs as
        # in inference (a random layer there is assumed not to move ids).
        if step.kind == "run" and _is_random(operation):
            raise ValueError(
                f"Invalid model: the ids of an Embedding or CategoryEncoding are computed "
                f"through the random layer `{operation.name}` ({type(operation).__name__}), "
                "so the ids checked before the step would not be those the step reads. "
                "Compute ids without random layers."
            )
        steps.append(step)
        needed.update(id(t) for t in node.input_tensors)
    steps.reverse()
    inputs = tuple(t for t in graph.inputs if id(t) in needed)
    return _Plan(tuple(steps), inputs, tuple(graph.inputs), tuple(wanted))


def _safe(ids, ok):
    """`ids` with the rows that hold an invalid id set to 0 (a valid id everywhere)."""
    rows = tf.reshape(ok, tf.concat([tf.shape(ok), tf.ones([tf.rank(ids) - 1], tf.int32)], 0))
    return tf.where(rows, ids, tf.zeros_like(ids))


def _checked_call(operation, args, kwargs, flags):
    """Calls a layer whose code no graph describes, checking its id layers' calls."""
    patched = []

    def checked(layer, original):
        low, high = id_range(layer)

        def call(inputs, *rest, **options):
            ok = valid_ids(inputs, low, high)
            flags.append(ok)
            return original(_safe(inputs, ok), *rest, **options)

        return call

    for layer in _id_layers(operation):
        had_own = "call" in layer.__dict__
        patched.append((layer, layer.call, had_own))
        layer.call = checked(layer, layer.call)
    try:
        return operation(*args, **kwargs)
    finally:
        for layer, original, had_own in reversed(patched):
            if had_own:
                layer.call = original
            else:
                del layer.call


def _run(plan: _Plan, feed: Dict[int, tf.Tensor], flags: List[tf.Tensor]) -> List[tf.Tensor]:
    """Runs `plan` on the graph inputs in `feed` (by id); appends each check to `flags`."""
    values = dict(feed)
    for step in plan.steps:
        node = step.node
        operation = node.operation
        args, kwargs = _keras_internals.node_arguments(node, values)
        outputs = None
        if step.kind == "check":
            ids = args[0]
            ok = valid_ids(ids, *step.bounds)
            flags.append(ok)
            if step.outputs_needed:
                outputs = operation(_safe(ids, ok), *args[1:], **kwargs)
        elif step.kind == "nested":
            inner = step.inner
            given = tf.nest.flatten(args[0])
            outputs = _run(inner, {id(t): v for t, v in zip(inner.all_inputs, given)}, flags)
        elif step.kind == "opaque":
            outputs = _checked_call(operation, args, kwargs, flags)
        else:
            outputs = operation(*args, **kwargs)
        if step.outputs_needed:
            for tensor, value in zip(node.outputs, tf.nest.flatten(outputs)):
                values[id(tensor)] = value
    return [values[id(t)] for t in plan.wanted]


class IdCheck:
    """Drops the examples whose ids are invalid for a model's id layers.

    Build it with `IdCheck.of(model)`; `drop_invalid` runs in the train step.
    """

    def __init__(self, plan: _Plan):
        self._plan = plan
        inputs = {id(t) for t in plan.inputs}
        checks_only = all(s.kind == "check" and not s.outputs_needed for s in plan.steps)
        # Ids that are model inputs: checked as they are, no layer runs.
        self._direct = checks_only and all(
            id(s.node.input_tensors[0]) in inputs for s in plan.steps
        )
        self._row_wise = all(
            s.kind == "check" or (s.kind == "run" and type(s.node.operation) in _ROW_WISE)
            for s in plan.steps
        )

    @classmethod
    def of(cls, model: keras.Model) -> Optional["IdCheck"]:
        """The check of `model`'s ids, or None for a model without id layers.

        Args:
          model: The functional model the per-example routes run (a model
            with string inputs: the numeric part after their preprocessing).

        Raises:
          ValueError: when the ids are computed through a random layer, or
            an all-zero example has invalid ids itself.
        """
        plan = _plan(model, ())
        if not plan.steps:
            return None
        check = cls(plan)
        check._check_replacement()
        return check

    def _check_replacement(self):
        # A dropped example's inputs become zeros: they must read valid ids.
        zeros = {}
        for tensor in self._plan.inputs:
            shape = [1] + [1 if d is None else int(d) for d in tensor.shape[1:]]
            zeros[id(tensor)] = tf.zeros(shape, tf.as_dtype(tensor.dtype))
        flags = []
        _run(self._plan, zeros, flags)
        if not all(bool(tf.reduce_all(f)) for f in flags):
            raise ValueError(
                "Invalid model: an example whose inputs are all zeros reads ids out of range "
                "in an Embedding or CategoryEncoding layer. tan_keras drops an example with "
                "invalid ids by replacing its inputs with zeros, which must be valid. Make "
                "the layers before the id layer map 0 to a valid id (e.g. add the offset "
                "in the input pipeline instead of inside the model)."
            )

    def valid_examples(self, by_input: Dict[int, tf.Tensor]) -> tf.Tensor:
        """[batch] bool: whether every id of each example (all its views) is valid.

        Args:
          by_input: {id(model input): [batch, K, ...] views} for every input.
        """
        views = [by_input[id(t)] for t in self._plan.inputs]
        batch = tf.shape(views[0])[0]
        if self._direct:
            flags = []
            _run(self._plan, dict(zip(map(id, self._plan.inputs), views)), flags)
            return tf.reduce_all(tf.stack(flags), axis=0)
        if self._row_wise:
            rows = [tf.reshape(v, tf.concat([[-1], tf.shape(v)[2:]], 0)) for v in views]
            flags = []
            _run(self._plan, dict(zip(map(id, self._plan.inputs), rows)), flags)
            per_row = tf.reduce_all(tf.stack(flags), axis=0)
            return tf.reduce_all(tf.reshape(per_row, [batch, -1]), axis=1)

        def one_example(example_views):
            flags = []
            _run(self._plan, dict(zip(map(id, self._plan.inputs), example_views)), flags)
            return tf.reduce_all(tf.stack([tf.reduce_all(f) for f in flags]))

        return tf.vectorized_map(one_example, views)

    def drop_invalid(self, views: Any, by_input: Dict[int, tf.Tensor], mask: tf.Tensor):
        """Masks out the examples with an invalid id and zeroes their id inputs.

        Args:
          views: The training inputs, [batch, K, ...] each, structured as the
            model's inputs.
          by_input: The same tensors keyed by the id of the model input they feed.
          mask: [batch] real-row mask.

        Returns:
          (views, mask, num_invalid): the inputs with the dropped examples'
          rows of the inputs their ids come from set to zero, the mask
          without them, and the count of real examples dropped.
        """
        valid = self.valid_examples(by_input)
        real = tf.cast(mask, tf.float32) > 0
        dropped = tf.logical_and(real, tf.logical_not(valid))
        num_invalid = tf.reduce_sum(tf.cast(dropped, tf.float32))
        mask = tf.where(valid, mask, tf.zeros_like(mask))
        replaced = {id(by_input[id(t)]) for t in self._plan.inputs}
        views = tf.nest.map_structure(lambda t: _safe(t, valid) if id(t) in replaced else t, views)
        return views, mask, num_invalid
