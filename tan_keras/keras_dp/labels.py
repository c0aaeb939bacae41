"""One policy for invalid labels, on every route, with and without XLA.

A sparse categorical loss with a label outside [0, classes) has no value:
without XLA TensorFlow raises in the middle of training (at whichever step
first samples that example), under XLA it returns NaN. tan_keras treats
such an example like one with a non-finite gradient: it is dropped from
the step (it contributes exactly 0, so the guarantee is unaffected) and
counted in the `nonfinite_examples` metric, whatever the route. Check
your labels if that metric is not 0.
"""

from typing import Optional, Tuple

import keras
import tensorflow as tf

_SPARSE_NAMES = ("sparse_categorical_crossentropy",)


def sparse_classes(loss, output) -> Optional[int]:
    """The number of classes when `loss` takes integer class labels, else None.

    Args:
      loss: The loss given to `compile` for this output.
      output: The model output it applies to (its last axis holds the
        classes), anything with a `shape`.

    Returns:
      The class count, or None for a loss without class-index labels or an
      output whose class axis is unknown.
    """
    sparse = (
        isinstance(loss, keras.losses.SparseCategoricalCrossentropy)
        or loss in _SPARSE_NAMES
        or loss is keras.losses.sparse_categorical_crossentropy
    )
    if not sparse:
        return None
    classes = output.shape[-1]
    return None if classes is None else int(classes)


def drop_invalid(
    y: tf.Tensor, mask: tf.Tensor, classes: int
) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Masks out the rows whose class label is outside [0, classes).

    Args:
      y: [batch] or [batch, 1] class labels (integer or float).
      mask: [batch] real-row mask.
      classes: The number of classes.

    Returns:
      (y, mask, num_invalid): labels with invalid ones replaced by 0 (so the
      loss stays finite), the mask without them, and the count of real rows
      that were invalid.
    """
    flat = tf.reshape(y, [tf.shape(y)[0], -1])
    valid = tf.reduce_all(tf.logical_and(flat >= 0, flat < tf.cast(classes, flat.dtype)), axis=1)
    # A fractional label (2.5) is invalid too: it would be truncated silently.
    valid = (
        tf.logical_and(valid, tf.reduce_all(tf.equal(flat, tf.round(flat)), axis=1))
        if flat.dtype.is_floating
        else valid
    )
    real = tf.cast(mask, tf.float32) > 0
    num_invalid = tf.reduce_sum(tf.cast(tf.logical_and(real, tf.logical_not(valid)), tf.float32))
    shape = tf.concat([[-1], tf.ones([tf.rank(y) - 1], tf.int32)], 0)
    y = tf.where(tf.reshape(valid, shape), y, tf.zeros_like(y))
    mask = tf.where(valid, mask, tf.zeros_like(mask))
    return y, mask, num_invalid
