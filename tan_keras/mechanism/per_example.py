"""Per-example gradients with `tf.vectorized_map`, augmentation multiplicity.

An example and its K augmented views are ONE privacy unit: the model sees the
K views as a batch of K, the per-view losses are averaged, and the gradient of
that average (= the average of the K view gradients) is what gets clipped.
"""

import logging
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple, Union

import keras
import tensorflow as tf

from tan_keras.mechanism import ghost, tapping

# pfor logs this for every convolution it vectorizes; the fallback is known
# and measured (see README, Benchmarks: ghost and layerwise exist for it), and
# the line would repeat on every trace of the train step. Only this exact
# message is dropped; every other TensorFlow warning still shows.
_PFOR_WHILE_LOOP_NOTE = "uses a while_loop. Fix that!"


class _DropPforWhileLoopNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _PFOR_WHILE_LOOP_NOTE not in record.getMessage()


tf.get_logger().addFilter(_DropPforWhileLoopNote())


def tf_variable(variable):
    """The TensorFlow variable under a Keras 3 variable (others unchanged).

    Gradient tapes, `tf.distribute` updates and `tf.where` take TensorFlow
    variables; under a strategy a Keras variable wraps a distributed one.
    """
    return variable.value if isinstance(variable, keras.Variable) else variable


def unreduced_loss_fn(loss) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """Returns a function giving one loss value per example (no reduction).

    Args:
      loss: A Keras loss name, function, or `keras.losses.Loss` instance.

    Returns:
      A callable `(y_true, y_pred) -> [batch]` losses.

    Raises:
      ValueError: if `loss` is not a Keras loss.
    """
    try:
        resolved = keras.losses.get(loss)
    except ValueError as err:
        raise ValueError(
            f"Invalid value for `loss`: expected a Keras loss. Received: loss={loss!r}"
        ) from err
    if isinstance(resolved, keras.losses.Loss):
        # `Loss.call` is the unreduced per-example loss in Keras 2 and 3.
        return resolved.call
    return resolved


def as_views(x: Any, augmult: int, model_input_rank: Any) -> Any:
    """Returns training inputs as [batch, K, *input_shape].

    Args:
      x: Either [batch, *input_shape] (only when K = 1) or
        [batch, K, *input_shape]; or a list or dict of such tensors, one per
        model input (each with its own views axis).
      augmult: K.
      model_input_rank: Rank of the model's input including the batch axis;
        for structured `x`, the same structure of ranks (see `input_ranks`).

    Returns:
      `x` with an explicit views axis of size K on every tensor.

    Raises:
      ValueError: if a shape does not match K.
    """
    if tf.nest.is_nested(x):
        return tf.nest.map_structure(lambda t, r: as_views(t, augmult, r), x, model_input_rank)
    rank = x.shape.rank
    if rank == model_input_rank - 1 and rank >= 1:
        # Keras feeds [batch] to an input of shape (1,) (texts, one column
        # of a table) with the last axis added; do as it does.
        x, rank = tf.expand_dims(x, -1), model_input_rank
    if rank == model_input_rank + 1:
        views = x.shape[1]
        if views is not None and views != augmult:
            raise ValueError(
                f"Invalid training input shape {x.shape}: axis 1 holds {views} "
                f"augmented views but the model was built with augmult={augmult}."
            )
        return x
    if rank == model_input_rank:
        if augmult != 1:
            raise ValueError(
                f"Invalid training input shape {x.shape}: augmult={augmult} expects "
                f"inputs of shape [batch, {augmult}, ...] (the views of each example "
                "together); build them with tan_keras.make_poisson_dataset."
            )
        return tf.expand_dims(x, 1)
    raise ValueError(
        f"Invalid training input shape {x.shape}: expected rank {model_input_rank} "
        f"([batch, ...]) or {model_input_rank + 1} ([batch, K, ...])."
    )


def input_ranks(inputs: Any, x: Any) -> Any:
    """The model input rank of each tensor of `x`, in the structure of `x`.

    Args:
      inputs: The model's inputs as it was built with them (a tensor, list or
        dict of symbolic tensors with `.shape` and `.name`).
      x: A batch of training inputs: a tensor, or a list (in the order of the
        model's inputs) or dict (keyed by input name) of tensors.

    Returns:
      An int, or the structure of `x` holding ints.

    Raises:
      ValueError: naming `x`, when its structure does not match the inputs.
    """
    flat_inputs = tf.nest.flatten(inputs)
    if not tf.nest.is_nested(x):
        if len(flat_inputs) != 1:
            raise _invalid_inputs(flat_inputs, "a single tensor")
        return len(flat_inputs[0].shape)
    if isinstance(x, Mapping):
        by_name = {}
        if isinstance(inputs, Mapping):
            by_name.update({str(k): t for k, t in inputs.items()})
        for t in flat_inputs:
            by_name.setdefault(t.name, t)
        unknown = [k for k in x if k not in by_name]
        if unknown or len(x) != len(flat_inputs):
            raise _invalid_inputs(flat_inputs, f"a dict with keys {sorted(x)}")
        return {k: len(by_name[k].shape) for k in x}
    if len(x) != len(flat_inputs):
        raise _invalid_inputs(flat_inputs, f"{len(x)} tensors")
    return type(x)(len(t.shape) for t in flat_inputs)


def _invalid_inputs(flat_inputs, received: str) -> ValueError:
    names = [t.name for t in flat_inputs]
    return ValueError(
        f"Invalid value for `x`: expected {len(names)} input tensor(s) matching the "
        f"model's inputs {names} (a list in that order, or a dict keyed by those names). "
        f"Received: {received}"
    )


def first_leaf(structure: Any) -> tf.Tensor:
    """The first tensor of a (possibly nested) structure: all share its rows."""
    return tf.nest.flatten(structure)[0]


def _map_examples(fn, elems):
    """`tf.map_fn(fn, elems)`, its output structure read from a trace of `fn`."""
    one = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape[1:], t.dtype), elems)
    outputs = tf.function(fn, autograph=False).get_concrete_function(one).structured_outputs
    signature = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), outputs)
    return tf.map_fn(fn, elems, fn_output_signature=signature)


def per_example_gradients(
    model: keras.Model,
    loss_fn: Callable[[tf.Tensor, tf.Tensor], tf.Tensor],
    views: tf.Tensor,
    y: tf.Tensor,
    ghost_layers: Sequence[keras.layers.Layer] = (),
    example_weights: Optional[tf.Tensor] = None,
    one_at_a_time: bool = False,
) -> Tuple[List[Union[tf.Tensor, ghost.GhostGradient]], tf.Tensor, tf.Tensor]:
    """Gradient of each example's view-averaged loss, vectorized over examples.

    Args:
      model: The Keras model (called in training mode on K views at a time).
      loss_fn: Unreduced loss, `(y_true, y_pred) -> [K]`.
      views: [batch, K, *input_shape] inputs (or a list or dict of them, one
        per model input).
      y: [batch, ...] labels, one per example (shared by its views); a list
        of them for a model with several outputs.
      ghost_layers: Layers (from `ghost.select_layers`) whose kernels'
        per-example gradients are not formed: the vectorized pass only
        returns their inputs and pre-activation output gradients, as a
        `ghost.GhostGradient`.
      example_weights: Optional [batch] weights: example i's loss is
        weights[i] times its view-averaged loss (before any clipping).
      one_at_a_time: Loop over the examples (`tf.map_fn`) instead of
        vectorizing: the same gradients, slower, for ops whose vectorized
        form crashes (see `model_checks.vectorizing_crashes`).

    Returns:
      (grads, losses, predictions): grads holds, per trainable variable, a
      [batch, *var_shape] tensor, or a `ghost.GhostGradient` for the kernel
      of a ghost layer; losses is [batch] view-averaged losses; predictions
      is [batch, ...] model outputs averaged over the views (in the
      structure of the model's outputs).

    Raises:
      ValueError: if a layer in `ghost_layers` has no ghost rule.
    """
    unsupported = [layer.name for layer in ghost_layers if not ghost.has_rule(layer)]
    if unsupported:
        raise ValueError(
            "Invalid value for `ghost_layers`: expected Dense, Embedding or ungrouped "
            "channels-last Conv2D layers with 'valid' or 'same' padding (see "
            "ghost.select_layers). "
            f"Received: layers without a ghost rule {unsupported}"
        )
    variables = model.trainable_variables
    ghost_by_kernel = {id(ghost.clipped_variable(layer)): layer for layer in ghost_layers}
    formed = [tf_variable(v) for v in variables if id(v) not in ghost_by_kernel]
    # Filled while tracing: which layer each tapped call belongs to.
    tapped_layers: List[keras.layers.Layer] = []

    def one_example(args):
        example_views, label = args[:2]
        num_views = tf.shape(first_leaf(example_views))[0]
        labels = tf.nest.map_structure(
            lambda t: tf.repeat(tf.expand_dims(t, 0), num_views, axis=0), label
        )
        taps: List[tapping.Tap] = []
        with tf.GradientTape() as tape, tapping.recording(ghost_layers, taps):
            pred = model(example_views, training=True)
            loss = tf.reduce_mean(loss_fn(labels, pred))
            if example_weights is not None:
                loss = loss * tf.cast(args[2], loss.dtype)
        tapped_layers[:] = [tap.layer for tap in taps]
        grads = tape.gradient(
            loss,
            formed + [tap.output for tap in taps],
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        tapped = ([tap.inputs for tap in taps], grads[len(formed) :])
        mean_pred = tf.nest.map_structure(lambda p: tf.reduce_mean(p, axis=0), pred)
        return grads[: len(formed)], tapped, loss, mean_pred

    # The weights travel only when given: an unused input still costs pfor.
    elems = (views, y) if example_weights is None else (views, y, example_weights)
    if one_at_a_time:
        formed_grads, (tap_inputs, tap_grads), losses, preds = _map_examples(one_example, elems)
    else:
        formed_grads, (tap_inputs, tap_grads), losses, preds = tf.vectorized_map(one_example, elems)
    if not ghost_layers:
        return list(formed_grads), losses, preds
    calls = {}
    for layer, a, g in zip(tapped_layers, tap_inputs, tap_grads):
        calls.setdefault(id(layer), []).append((a, g))
    batch = tf.shape(first_leaf(y))[0]
    grads, next_formed = [], iter(formed_grads)
    for variable in variables:
        layer = ghost_by_kernel.get(id(variable))
        if layer is None:
            grads.append(next(next_formed))
        elif id(layer) in calls:
            inputs, output_grads = zip(*calls[id(layer)])
            grads.append(ghost.GhostGradient(layer, inputs, output_grads))
        else:  # the layer was not called
            grads.append(tf.zeros(tf.concat([[batch], variable.shape], 0), variable.dtype))
    return grads, losses, preds
