"""Each example's loss for a model with one or several outputs.

Keras sums the outputs' losses, each times its `loss_weights` entry. DP-SGD
keeps that meaning per example: example i's loss is

    l_i = sum_o w_o * mean(loss_o(y_io, f_o(x_i)))

(the mean over the K views and any other non-batch axis of that output's
unreduced loss), and the gradient of l_i is what gets clipped. So every
output's term of an example is clipped together with its other terms, and no
output's labels are ever compared with another output's predictions.

Outputs are matched as Keras matches them: a single loss applies to every
output; a list holds one loss per output in the model's output order; a dict
is keyed by output name (the key of a model built with a dict of outputs, or
the output layer's name). `None` leaves an output out of the loss.
"""

from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence

import keras
import tensorflow as tf

from tan_keras import _keras_internals, _validate
from tan_keras.keras_dp import labels as labels_module
from tan_keras.mechanism import per_example

UnreducedLoss = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


class OutputLosses(NamedTuple):
    """The loss of each output, in the model's flat output order.

    Attributes:
      names: Each output's accepted names (dict keys for losses and labels).
      losses: Each output's unreduced loss `(y_true, y_pred) -> [rows, ...]`,
        or None for an output outside the loss.
      weights: Each output's loss weight.
      sparse_classes: Each output's class count when its loss takes class
        indices (see `labels.sparse_classes`), else None.
    """

    names: List[Sequence[str]]
    losses: List[Optional[UnreducedLoss]]
    weights: List[float]
    sparse_classes: List[Optional[int]]

    @property
    def several(self) -> bool:
        """Whether the model has several outputs (labels are then structured)."""
        return len(self.names) > 1

    def flat_labels(self, y: Any) -> Any:
        """The labels as one tensor per output, in the flat output order.

        Args:
          y: One tensor for a single-output model; for several outputs a list
            or tuple in output order, or a dict keyed by output name.

        Returns:
          The tensor for a single output; a list of tensors (None for an
          output without loss and without labels) for several.

        Raises:
          ValueError: naming `y`, when its structure does not match the outputs.
        """
        if not self.several:
            # A tensor, or a list, tuple or dict holding one.
            leaves = tf.nest.flatten(y)
            if len(leaves) != 1:
                raise _validate.invalid(
                    "y",
                    f"one label tensor for the model's one output ({_describe(self.names)})",
                    f"{len(leaves)} tensors",
                )
            return leaves[0]
        if isinstance(y, Mapping):
            lookup = _index_by_name(self.names)
            flat = []
            for index, (names, loss) in enumerate(zip(self.names, self.losses)):
                found = [y[name] for name in names if name in y and lookup[name] == index]
                if not found and loss is not None:
                    raise _validate.invalid(
                        "y",
                        f"labels for every output with a loss, keyed by {_describe(self.names)}",
                        sorted(y),
                    )
                flat.append(found[0] if found else None)
            return flat
        if isinstance(y, (list, tuple)) and len(y) == len(self.names):
            return list(y)
        raise _validate.invalid(
            "y",
            f"a list of {len(self.names)} label tensors (one per output, in the order "
            f"{_describe(self.names)}) or a dict keyed by output name",
            type(y).__name__ if not isinstance(y, (list, tuple)) else f"{len(y)} tensors",
        )

    def per_example_loss(self, y: Any, y_pred: Any) -> tf.Tensor:
        """Each row's loss: the weighted sum over outputs of their mean loss.

        Args:
          y: Labels from `flat_labels` (rows = examples or views).
          y_pred: The model's predictions for the same rows (its structure).

        Returns:
          [rows] losses (float32 or the loss's dtype).
        """
        y_flat = [y] if not self.several else list(y)
        pred_flat = tf.nest.flatten(y_pred)
        total = None
        for loss, weight, y_o, pred_o in zip(self.losses, self.weights, y_flat, pred_flat):
            if loss is None:
                continue
            value = _mean_per_row(loss(*same_rank(y_o, pred_o)))
            if weight != 1.0:
                value = value * tf.cast(weight, value.dtype)
            total = value if total is None else total + tf.cast(value, total.dtype)
        return total

    def predictions_like_labels(self, y: Any, y_pred: Any) -> Any:
        """`y` packed into the structure of `y_pred`, for Keras's compiled metrics."""
        if not self.several:
            return y
        return tf.nest.pack_sequence_as(y_pred, list(y))


def same_rank(y_true: tf.Tensor, y_pred: tf.Tensor):
    """Labels and predictions whose ranks differ by a last axis of 1, made equal.

    What Keras does before every loss it wraps, so that labels of shape
    (N,) go with a one-unit output (N, 1), as `fit(x, y)` accepts them; a
    loss given as a function name would otherwise be called on unequal ranks.
    """
    y_true = tf.convert_to_tensor(y_true)
    y_pred = tf.convert_to_tensor(y_pred)
    true_rank, pred_rank = y_true.shape.rank, y_pred.shape.rank
    if true_rank is None or pred_rank is None:
        return y_true, y_pred
    if pred_rank == true_rank + 1 and y_pred.shape[-1] == 1:
        return tf.expand_dims(y_true, -1), y_pred
    if true_rank == pred_rank + 1 and y_true.shape[-1] == 1:
        return tf.squeeze(y_true, -1), y_pred
    return y_true, y_pred


def _mean_per_row(values: tf.Tensor) -> tf.Tensor:
    # A sequence output's loss is [rows, steps]: Keras averages it over all
    # elements, which per example is the mean over its non-batch axes.
    if values.shape.rank is not None and values.shape.rank <= 1:
        return values
    return tf.reduce_mean(tf.reshape(values, [tf.shape(values)[0], -1]), axis=1)


def output_names(model: keras.Model) -> List[Sequence[str]]:
    """Each output's accepted names, in the model's flat output order."""
    structure = _keras_internals.outputs_structure(model)
    layer_names = list(getattr(model, "output_names", None) or [])
    keys = sorted(structure) if isinstance(structure, Mapping) else []
    count = len(model.outputs)
    names = []
    for index in range(count):
        accepted = []
        if index < len(keys):
            accepted.append(str(keys[index]))
        if index < len(layer_names) and layer_names[index] not in accepted:
            accepted.append(layer_names[index])
        names.append(accepted)
    return names


def resolve(model: keras.Model, loss: Any, loss_weights: Any = None) -> OutputLosses:
    """Matches `compile`'s `loss` and `loss_weights` to the model's outputs.

    Args:
      model: The model being compiled (functional: its outputs are known).
      loss: One Keras loss (for every output), a list with one per output, or
        a dict keyed by output name; None entries leave an output out.
      loss_weights: None (all 1), a list with one per output, or a dict keyed
        by output name (outputs not listed weigh 1).

    Returns:
      The `OutputLosses`.

    Raises:
      ValueError: naming `loss` or `loss_weights`, for a missing loss, a
        structure that does not match the outputs, an unknown output name, a
        weight that is not a finite number >= 0, or no output with a loss.
    """
    names = output_names(model)
    if loss is None:
        raise _validate.invalid("loss", "a Keras loss (name, function or Loss instance)", None)
    per_output = _per_output("loss", loss, names, default=None, broadcast=True)
    weights = _per_output("loss_weights", loss_weights, names, default=1.0, broadcast=False)
    if all(entry is None for entry in per_output):
        raise _validate.invalid("loss", "a loss for at least one output", loss)
    resolved = [
        None if entry is None else per_example.unreduced_loss_fn(entry) for entry in per_output
    ]
    checked_weights = [
        _validate.real("loss_weights", 1.0 if w is None else w, low=0.0) for w in weights
    ]
    classes = [
        None if entry is None else labels_module.sparse_classes(entry, model.outputs[index])
        for index, entry in enumerate(per_output)
    ]
    return OutputLosses(names, resolved, checked_weights, classes)


def _per_output(argument: str, value: Any, names, default: Any, broadcast: bool) -> List[Any]:
    count = len(names)
    if value is None:
        return [default] * count
    if isinstance(value, Mapping):
        lookup = _index_by_name(names)
        unknown = [key for key in value if key not in lookup]
        if unknown:
            raise _validate.invalid(
                argument, f"a dict keyed by output names ({_describe(names)})", unknown
            )
        entries = [default] * count
        named = {}
        for key, entry in value.items():
            index = lookup[key]
            if index in named:
                raise _validate.invalid(
                    argument,
                    f"one entry per output ({named[index]!r} and {key!r} name the same output)",
                    sorted(value),
                )
            named[index] = key
            entries[index] = entry
        return entries
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise _validate.invalid(
                argument, f"one entry per output ({count}: {[n[0] for n in names]})", value
            )
        return list(value)
    if broadcast or count == 1:
        # Keras applies one loss to every output, each against its own labels.
        return [value] * count
    raise _validate.invalid(argument, f"a list or dict with one entry per output ({count})", value)


def _index_by_name(names: Sequence[Sequence[str]]) -> Dict[str, int]:
    """The output each accepted name stands for.

    An output's dict key wins over another output's layer name (a model
    built with {"a": layer_b(h), "b": layer_a(h)}), as in Keras.
    """
    lookup: Dict[str, int] = {}
    for rank in range(max((len(accepted) for accepted in names), default=0)):
        for index, accepted in enumerate(names):
            if rank < len(accepted):
                lookup.setdefault(accepted[rank], index)
    return lookup


def _describe(names: Sequence[Sequence[str]]) -> str:
    """The outputs' accepted names, for error messages."""
    return ", ".join(" / ".join(repr(n) for n in accepted) for accepted in names)
