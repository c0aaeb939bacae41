"""String inputs turned into numbers inside the model, before the DP step.

Per-example gradients run the model under `tf.vectorized_map`, which has no
rules for string operations. A Keras text model usually starts with a
preprocessing layer that maps strings to numbers (`TextVectorization`,
`StringLookup`, `Hashing`) and holds no weights. Such a layer is split off:
in the DP step it runs once on the whole micro-batch (all K views), and the
per-example routes see only the numeric rest of the model (the layers after
it share their weights with the model, nothing is copied). Inference,
`evaluate` and `save` use the whole model, strings included.

Privacy. The split is exact only if each example's numbers depend on its own
strings alone: the preprocessing layers accepted are the Keras ones that map
each row by itself with fixed tables, and their outputs must have a static
shape (a `TextVectorization` without `output_sequence_length` pads to the
longest text of the batch, so one example's length would change the others'
inputs). Their vocabulary is part of the model: one adapted on the private
training set is a release of that data that no epsilon covers; adapt it on
public data or give it explicitly (a vocabulary not given as `vocabulary=`
is warned about with a `NotPrivateWarning`). A custom `standardize`
or `split` callable of `TextVectorization` sees the whole micro-batch: it
must map each text by itself (not checked).
"""

from typing import Any, Dict, List, Mapping, NamedTuple, Optional

import keras
import tensorflow as tf

from tan_keras import _keras_internals

# Exact types: each maps a row to a row with fixed tables and no weights.
_ROW_WISE_STRING_LAYERS = (
    keras.layers.TextVectorization,
    keras.layers.StringLookup,
    keras.layers.Hashing,
)


class StringSplit(NamedTuple):
    """The model cut after its string preprocessing.

    Attributes:
      prefix: A model from the string inputs to the preprocessed tensors.
      suffix: A model from the preprocessed tensors, then the numeric
        inputs, to the outputs; it shares its layers with the whole model.
      string_inputs: The whole model's string inputs (symbolic), in the
        prefix's input order.
      numeric_inputs: The whole model's numeric inputs, in the order they
        follow the preprocessed tensors among the suffix's inputs.
    """

    prefix: keras.Model
    suffix: keras.Model
    string_inputs: List[Any]
    numeric_inputs: List[Any]

    def numeric_views(self, model: keras.Model, views: Any) -> List[tf.Tensor]:
        """The suffix's inputs for training inputs `views` ([batch, K, ...] each).

        Args:
          model: The whole model (its inputs' structure matches `views`).
          views: Training inputs with their views axis, structured like the
            model's inputs.

        Returns:
          The suffix's inputs, [batch, K, ...] each, in its input order.
        """
        by_input = leaves_by_input(model, views)
        strings = [by_input[id(t)] for t in self.string_inputs]
        first = strings[0]
        batch, count = tf.shape(first)[0], tf.shape(first)[1]
        rows = [tf.reshape(s, tf.concat([[-1], tf.shape(s)[2:]], 0)) for s in strings]
        processed = self.prefix(rows if len(rows) > 1 else rows[0], training=False)
        processed = processed if isinstance(processed, (list, tuple)) else [processed]
        static_batch, static_views = first.shape[0], first.shape[1]

        def grouped(t):
            out = tf.reshape(t, tf.concat([[batch, count], tf.shape(t)[1:]], 0))
            return tf.ensure_shape(out, [static_batch, static_views, *t.shape[1:]])

        return [grouped(t) for t in processed] + [by_input[id(t)] for t in self.numeric_inputs]


def split(model: keras.Model) -> Optional[StringSplit]:
    """Cuts `model` after the preprocessing of its string inputs, if it has any.

    Args:
      model: A functional model.

    Returns:
      None for a model without string inputs, else the `StringSplit`.

    Raises:
      ValueError: naming the layer, when a string reaches anything but a
        row-wise Keras preprocessing layer (and what to do instead), or a
        preprocessed tensor has no static shape.
    """
    inputs = list(model.inputs or [])
    string_inputs = [t for t in inputs if t.dtype == "string"]
    if not string_inputs:
        return None
    string_tensors = {id(t) for t in string_inputs}
    # The numeric outputs of the preprocessing layers (their ids).
    prefix_tensors = set()
    prefix_layers = {}
    # Operations come in topological order: a string tensor is known before
    # any operation reads it.
    for operation in _keras_internals.graph_operations(model):
        if isinstance(operation, keras.layers.InputLayer):
            continue
        for node in getattr(operation, "_inbound_nodes", []):
            sources = list(node.input_tensors)
            from_strings = [t for t in sources if id(t) in string_tensors]
            if not from_strings:
                continue
            if type(operation) not in _ROW_WISE_STRING_LAYERS or len(from_strings) != len(sources):
                raise _refusal(operation)
            prefix_layers[id(operation)] = operation
            for output in node.outputs:
                (string_tensors if output.dtype == "string" else prefix_tensors).add(id(output))
    boundary = _boundary(model, prefix_tensors | string_tensors, prefix_layers)
    strings_read = [t.name for t in boundary if t.dtype == "string"]
    if strings_read:  # only possible through a model output, refused in _boundary
        raise _refusal(model)
    for tensor in boundary:
        if None in tuple(tensor.shape[1:]):
            raise ValueError(
                f"Invalid value for `inputs`: the preprocessed strings `{tensor.name}` have "
                f"no static shape ({tensor.shape}). Each example's numbers must not depend "
                "on the other texts of its batch; give TextVectorization an "
                "output_sequence_length (padding to the batch's longest text would let one "
                "example change the others' inputs)."
            )
    numeric_inputs = [t for t in inputs if t.dtype != "string"]
    prefix = _keras_internals.submodel(
        model,
        string_inputs if len(string_inputs) > 1 else string_inputs[0],
        boundary if len(boundary) > 1 else boundary[0],
    )
    suffix = _keras_internals.submodel(
        model, boundary + numeric_inputs, _keras_internals.outputs_structure(model)
    )
    return StringSplit(prefix, suffix, string_inputs, numeric_inputs)


def _boundary(model, prefix_tensors, prefix_layers) -> List[Any]:
    """Preprocessed tensors read by the rest of the model, each once, in order."""
    found: Dict[int, Any] = {}
    for operation in _keras_internals.graph_operations(model):
        if id(operation) in prefix_layers or isinstance(operation, keras.layers.InputLayer):
            continue
        for node in getattr(operation, "_inbound_nodes", []):
            for tensor in node.input_tensors:
                if id(tensor) in prefix_tensors:
                    found.setdefault(id(tensor), tensor)
    for tensor in tf.nest.flatten(_keras_internals.outputs_structure(model)):
        if id(tensor) in prefix_tensors:
            raise ValueError(
                f"Invalid value for `outputs`: output `{tensor.name}` is computed from "
                "strings alone, without any trained layer; there is nothing to train on it."
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
