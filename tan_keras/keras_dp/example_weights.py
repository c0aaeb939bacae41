"""Sample weights of `fit`, applied inside each example's loss; class weights refused.

Keras weighs each example's loss by its `sample_weight`. DP-SGD keeps that
meaning: example i's loss is w_i * l_i *before* clipping, so a weight of 100
or 0.5 changes the direction and size of that example's gradient, and
clipping still bounds what any one example moves the update by (C, whatever
its weight). A weight of 0 leaves the example out; negative weights are
refused. The guarantee treats w_i as part of example i's record: a weight
computed from other rows (the label counts, a normalisation over the
dataset) lets one example move every other example's weight, which the
clipping does not bound.

`fit(class_weight=...)` is refused (`class_weights.py`).
"""

from typing import Optional

import tensorflow as tf

# The step's message for a negative weight (kept when fit scrubs the error).
NEGATIVE_WEIGHT = "Invalid value for `sample_weight`: expected weights >= 0"


def example_weights(sample_weight: Optional[tf.Tensor]) -> Optional[tf.Tensor]:
    """Each example's loss weight: its sample weight, checked to be >= 0.

    Args:
      sample_weight: [batch] weights >= 0, or None.

    Returns:
      [batch] float32 weights, or None when none is given.
    """
    if sample_weight is None:
        return None
    weights = tf.reshape(tf.cast(sample_weight, tf.float32), [-1])
    check = tf.debugging.assert_non_negative(weights, message=NEGATIVE_WEIGHT)
    with tf.control_dependencies([check]):
        return tf.identity(weights)
