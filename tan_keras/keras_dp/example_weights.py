"""Sample and class weights of `fit`, applied inside each example's loss.

Keras weighs each example's loss by its `sample_weight` (and by the
`class_weight` of its label). DP-SGD keeps that meaning: example i's loss is
w_i * l_i *before* clipping, so a weight of 100 or 0.5 changes the direction
and size of that example's gradient, and clipping still bounds what any one
example moves the update by (C, whatever its weight). A weight of 0 leaves
the example out; negative weights are refused.
"""

from typing import Any, Mapping, Optional

import numpy as np
import tensorflow as tf

from tan_keras import _validate


def class_weight_table(class_weight: Optional[Mapping[Any, Any]]) -> Optional[np.ndarray]:
    """`fit`'s class_weight as a lookup vector (classes not listed weigh 1).

    Args:
      class_weight: {class index: weight >= 0}, or None.

    Returns:
      float32 [max class + 1] weights, or None.

    Raises:
      ValueError: naming `class_weight`, for a key that is not an integer >= 0
        or a weight that is not a finite float >= 0.
    """
    if class_weight is None:
        return None
    if not isinstance(class_weight, Mapping) or not class_weight:
        raise _validate.invalid("class_weight", "a dict {class index: weight >= 0}", class_weight)
    keys = {}
    for key, weight in class_weight.items():
        index = _validate.integer("class_weight", key, low=0, hint="Keys are class indices")
        weight = _validate.real("class_weight", weight, low=0.0, hint="Weights are >= 0")
        keys[index] = weight
    table = np.ones(max(keys) + 1, np.float32)
    for index, weight in keys.items():
        table[index] = weight
    return table


def example_weights(
    y: tf.Tensor, sample_weight: Optional[tf.Tensor], class_table: Optional[np.ndarray]
) -> Optional[tf.Tensor]:
    """Each example's loss weight: its sample weight times its class's.

    Args:
      y: [batch] class indices, [batch, 1], or [batch, classes] one-hot.
      sample_weight: [batch] weights >= 0, or None.
      class_table: From `class_weight_table`, or None.

    Returns:
      [batch] float32 weights, or None when neither is given.
    """
    weights = None
    if sample_weight is not None:
        weights = tf.reshape(tf.cast(sample_weight, tf.float32), [-1])
        check = tf.debugging.assert_non_negative(
            weights, message="Invalid value for `sample_weight`: expected weights >= 0"
        )
        with tf.control_dependencies([check]):
            weights = tf.identity(weights)
    if class_table is not None:
        if y.shape.rank == 2 and y.shape[-1] is not None and y.shape[-1] > 1:
            classes = tf.argmax(y, axis=-1)
        else:
            classes = tf.reshape(tf.cast(y, tf.int64), [-1])
        # Labels beyond the table weigh 1, as in Keras.
        table = tf.constant(np.append(class_table, 1.0).astype(np.float32))
        index = tf.minimum(tf.maximum(classes, 0), len(class_table))
        by_class = tf.gather(table, index)
        weights = by_class if weights is None else weights * by_class
    return weights


def same_table(a: Optional[np.ndarray], b: Optional[np.ndarray]) -> bool:
    """Whether two class-weight tables are equal (None equals None only)."""
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(np.all(a == b))
