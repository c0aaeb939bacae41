"""Row-wise preprocessing run once on the micro-batch, before the DP step.

Per-example gradients run the model one example at a time (or per row on
the layerwise route). Three kinds of layers at the head of a Keras model gain
nothing from it and lose much:

* string preprocessing (`TextVectorization`, `StringLookup`, `Hashing`):
  `tf.vectorized_map` has no rules for string operations;
* random image augmentation without weights (`RandomFlip`, `RandomRotation`,
  `RandomZoom`, `RandomTranslation`, `RandomContrast`, `RandomBrightness`,
  with `Rescaling`, `Resizing`, `CenterCrop` around them, or a `Sequential`
  of these): inside the per-example computation their image transforms fall
  back to a loop, one example at a time, and fill the console with "Using a
  while_loop" messages; and all examples of a micro-batch share one draw;
* lookups on integer features (`IntegerLookup`, `Hashing`): their table
  lookups fall back to a loop too.

Such layers, applied to the model's inputs (or to what other such layers
computed from them), form the prefix: in the DP step it runs once on the
whole micro-batch, all K views as rows, in training mode (each row draws its
own augmentation), and the per-example routes see only the rest of the
model (its layers shared with the model, nothing copied). Inference,
`evaluate` and `save` use the whole model.

Privacy. Running them on the batch is exact only if each row's output
depends on its own input row (and on randomness that depends on no data)
alone: the layers accepted are exact Keras types that map each row by
itself, hold no weights, and draw their random parameters per row
(`RandomCrop` draws one window per batch, so all K views of an example would
share it: it stays inside the per-example computation, as do layers that mix
rows, such as `MixUp`, which the model checks refuse). Their outputs must
have a static shape (a `TextVectorization` without `output_sequence_length`
pads to the longest text of the batch, so one example's length would change
the others' inputs). Vocabularies and other adapted state are checked by
`provenance`. Image layers need batches of images (rank 4): Keras image
layers take a rank-3 tensor for one image, and on a batch of grayscale
[rows, H, W] images would transform across the examples, so those stay
inside the per-example computation. A `TextVectorization` with a custom
`standardize` or `split` callable (keras.io's `custom_standardization`)
could see the whole micro-batch: a prefix holding one runs one row at a
time (`tf.map_fn`), so the callable only ever sees one text.
"""

import collections
from typing import Any, Dict, List, Mapping, NamedTuple, Optional

import keras
import tensorflow as tf

from tan_keras import _keras_internals

# Exact types: each maps a row to a row with fixed tables and no weights.
_STRING_LAYERS = (
    keras.layers.TextVectorization,
    keras.layers.StringLookup,
    keras.layers.Hashing,
)
# Exact types: no weights, each row transformed by itself, random parameters
# drawn per row (checked for each in the tests).
_RANDOM_AUGMENTATIONS = (
    keras.layers.RandomFlip,
    keras.layers.RandomRotation,
    keras.layers.RandomZoom,
    keras.layers.RandomTranslation,
    keras.layers.RandomContrast,
    keras.layers.RandomBrightness,
)
# Deterministic row-wise layers that may come before, between or after them.
_DETERMINISTIC_ROW_LAYERS = (keras.layers.Rescaling, keras.layers.Resizing, keras.layers.CenterCrop)
# Exact types that map each value by itself through a fixed table, at any
# rank (keras.io's structured-data lookups on integer features): inside the
# per-example computation their table lookups fall back to a loop.
_NUMERIC_LOOKUPS = (keras.layers.IntegerLookup, keras.layers.Hashing)


class RowPrefix(NamedTuple):
    """The model cut after its row-wise preprocessing.

    Attributes:
      prefix: A model from the inputs it reads to the preprocessed tensors.
      suffix: A model from the preprocessed tensors, then the inputs the rest
        of the model reads directly, to the outputs; it shares its layers
        with the whole model.
      prefix_inputs: The whole model's inputs the prefix reads (symbolic), in
        the prefix's input order.
      direct_inputs: The whole model's inputs read by the rest of the model,
        in the order they follow the preprocessed tensors among the suffix's
        inputs.
      one_row_at_a_time: Whether the prefix holds user code that could see
        the whole batch (a `TextVectorization` callable), so it runs per row.
    """

    prefix: keras.Model
    suffix: keras.Model
    prefix_inputs: List[Any]
    direct_inputs: List[Any]
    one_row_at_a_time: bool = False

    def suffix_views(self, model: keras.Model, views: Any) -> List[tf.Tensor]:
        """The suffix's inputs for training inputs `views` ([batch, K, ...] each).

        The prefix runs in training mode on the batch * K rows: each view
        draws its own augmentation.

        Args:
          model: The whole model (its inputs' structure matches `views`).
          views: Training inputs with their views axis, structured like the
            model's inputs.

        Returns:
          The suffix's inputs, [batch, K, ...] each, in its input order.
        """
        by_input = leaves_by_input(model, views)
        read = [by_input[id(t)] for t in self.prefix_inputs]
        first = read[0]
        batch, count = tf.shape(first)[0], tf.shape(first)[1]
        rows = [tf.reshape(t, tf.concat([[-1], tf.shape(t)[2:]], 0)) for t in read]
        processed = self._run(rows)
        static_batch, static_views = first.shape[0], first.shape[1]

        def grouped(t):
            out = tf.reshape(t, tf.concat([[batch, count], tf.shape(t)[1:]], 0))
            return tf.ensure_shape(out, [static_batch, static_views, *t.shape[1:]])

        return [grouped(t) for t in processed] + [by_input[id(t)] for t in self.direct_inputs]

    def _run(self, rows: List[tf.Tensor]) -> List[tf.Tensor]:
        def call(inputs):
            out = self.prefix(inputs if len(inputs) > 1 else inputs[0], training=True)
            return list(out) if isinstance(out, (list, tuple)) else [out]

        if not self.one_row_at_a_time:
            return call(rows)
        signature = [tf.TensorSpec(t.shape[1:], t.dtype) for t in self.prefix.outputs]
        return tf.map_fn(
            lambda row: [t[0] for t in call([r[None] for r in row])],
            rows,
            fn_output_signature=signature,
        )


def _row_wise(operation: Any, reads_strings: bool, rank: int = 4) -> bool:
    """Whether `operation` may run in the prefix (on inputs of that kind and rank)."""
    if reads_strings:
        return type(operation) in _STRING_LAYERS
    if type(operation) in _NUMERIC_LOOKUPS:
        return True
    if rank != 4:
        # Image layers read rank 3 as one image: only batches of images.
        return False
    if type(operation) is keras.Sequential:
        return bool(operation.layers) and all(
            _row_wise(layer, False, rank) for layer in operation.layers
        )
    return type(operation) in _RANDOM_AUGMENTATIONS + _DETERMINISTIC_ROW_LAYERS


def _worth_cutting(operation: Any) -> bool:
    """Whether running `operation` on the batch saves a per-example loop."""
    if type(operation) is keras.Sequential:
        return any(_worth_cutting(layer) for layer in operation.layers)
    return type(operation) in _RANDOM_AUGMENTATIONS + _NUMERIC_LOOKUPS


def split(model: keras.Model) -> Optional[RowPrefix]:
    """Cuts `model` after its row-wise preprocessing, if it has any worth cutting.

    Args:
      model: A functional model.

    Returns:
      None for a model without string inputs, random augmentation or
      lookups at its head, else the `RowPrefix`.

    Raises:
      ValueError: naming the layer, when a string reaches anything but a
        row-wise Keras preprocessing layer (and what to do instead), or a
        preprocessed tensor has no static shape.
    """
    inputs = list(model.inputs or [])
    string_tensors = {id(t) for t in inputs if t.dtype == "string"}
    # Tensors the prefix has: the inputs, then what prefix layers compute.
    available = {id(t) for t in inputs}
    prefix_tensors = set()
    prefix_nodes = set()
    cut_worth_it = bool(string_tensors)
    # Producers come first: a tensor is known before any node reads it.
    nodes = _nodes(model)
    calls = collections.Counter(id(node.operation) for node in nodes)
    for node in nodes:
        operation = node.operation
        sources = list(node.input_tensors)
        from_strings = [t for t in sources if id(t) in string_tensors]
        in_prefix = (
            bool(sources)
            # A layer called again later in the model stays whole in it.
            and (calls[id(operation)] == 1 or bool(from_strings))
            and all(id(t) in available for t in sources)
            and all(_row_wise(operation, bool(from_strings), len(t.shape)) for t in sources)
            and (not from_strings or len(from_strings) == len(sources))
        )
        if from_strings and not in_prefix:
            raise _refusal(operation)
        if not in_prefix:
            continue
        prefix_nodes.add(id(node))
        cut_worth_it = cut_worth_it or _worth_cutting(operation)
        for output in node.outputs:
            available.add(id(output))
            prefix_tensors.add(id(output))
            if output.dtype == "string":
                string_tensors.add(id(output))
    if not cut_worth_it:
        return None
    boundary = _boundary(model, prefix_tensors, prefix_nodes)
    if any(t.dtype == "string" for t in boundary):  # only through a model output, refused above
        raise _refusal(model)
    for tensor in boundary:
        if None in tuple(tensor.shape[1:]):
            raise ValueError(
                f"Invalid value for `inputs`: the preprocessed inputs `{tensor.name}` have "
                f"no static shape ({tensor.shape}). Each example's numbers must not depend "
                "on the other examples of its batch; give TextVectorization an "
                "output_sequence_length (padding to the batch's longest text would let one "
                "example change the others' inputs)."
            )
    read_by_prefix = _read_by(model, lambda node: id(node) in prefix_nodes)
    read_directly = _read_by(model, lambda node: id(node) not in prefix_nodes)
    read_directly.update(id(t) for t in tf.nest.flatten(_keras_internals.outputs_structure(model)))
    prefix_inputs = [t for t in inputs if id(t) in read_by_prefix]
    direct_inputs = [t for t in inputs if id(t) in read_directly]
    prefix = _keras_internals.submodel(
        model,
        prefix_inputs if len(prefix_inputs) > 1 else prefix_inputs[0],
        boundary if len(boundary) > 1 else boundary[0],
    )
    suffix = _keras_internals.submodel(
        model, boundary + direct_inputs, _keras_internals.outputs_structure(model)
    )
    one_row = any(_user_code(node.operation) for node in nodes if id(node) in prefix_nodes)
    return RowPrefix(prefix, suffix, prefix_inputs, direct_inputs, one_row)


def _user_code(operation: Any) -> bool:
    """Whether a prefix layer calls code the package does not own on its batch."""
    if type(operation) is not keras.layers.TextVectorization:
        return False
    return any(
        not isinstance(getattr(operation, attribute, None), (str, type(None)))
        for attribute in ("_standardize", "_split")
    )


def _nodes(model) -> List[Any]:
    """The call nodes of the model's own graph, producers first (inputs left out)."""
    return [
        node
        for node in _keras_internals.graph_nodes(model)
        if not isinstance(node.operation, keras.layers.InputLayer)
    ]


def _read_by(model, selected) -> set:
    """Ids of the tensors read by the graph's nodes for which `selected(node)`."""
    return {id(t) for node in _nodes(model) if selected(node) for t in node.input_tensors}


def _boundary(model, prefix_tensors, prefix_nodes) -> List[Any]:
    """Preprocessed tensors read by the rest of the model, each once, in order."""
    found: Dict[int, Any] = {}
    for node in _nodes(model):
        if id(node) in prefix_nodes:
            continue
        for tensor in node.input_tensors:
            if id(tensor) in prefix_tensors:
                found.setdefault(id(tensor), tensor)
    for tensor in tf.nest.flatten(_keras_internals.outputs_structure(model)):
        if id(tensor) in prefix_tensors:
            raise ValueError(
                f"Invalid value for `outputs`: output `{tensor.name}` is computed by "
                "preprocessing alone, without any trained layer; there is nothing to train on it."
            )
    return list(found.values())


def _refusal(operation) -> ValueError:
    name = getattr(operation, "name", type(operation).__name__)
    return ValueError(
        f"Invalid value for `inputs`: strings reach `{name}` ({type(operation).__name__}), "
        "which per-example gradients cannot run on strings. Map strings to numbers first "
        "with keras.layers.TextVectorization (with output_sequence_length), StringLookup "
        "or Hashing directly on the string inputs (they are run once per micro-batch, "
        "outside the per-example computation), or do it in the tf.data pipeline."
    )


def leaves_by_input(model: keras.Model, x: Any) -> Dict[int, tf.Tensor]:
    """Each tensor of `x` keyed by the id of the model input it feeds.

    Args:
      model: A functional model.
      x: Inputs structured as the model's (a tensor, a list in input order,
        or a dict keyed by input name).
    """
    structure = _keras_internals.inputs_structure(model)
    flat_inputs = list(model.inputs)
    if not tf.nest.is_nested(x):
        return {id(flat_inputs[0]): x}
    if isinstance(x, Mapping):
        by_name = {t.name: t for t in flat_inputs}
        if isinstance(structure, Mapping):
            by_name.update({str(k): t for k, t in structure.items()})
        return {id(by_name[k]): v for k, v in x.items()}
    return {id(t): v for t, v in zip(flat_inputs, x)}
