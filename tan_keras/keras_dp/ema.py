"""The exponential moving average (EMA) of the weights.

The EMA is updated with each noisy update, from the released weights only,
so it is post-processing and costs no privacy. Its decay warms up as
min(d, (1 + t) / (10 + t)) at step t, so the first updates are not drowned
by the initial weights.
"""

import contextlib
from typing import Sequence

import tensorflow as tf

from tan_keras.mechanism import per_example


def decay_at(decay: float, step: tf.Tensor) -> tf.Tensor:
    """The warmed-up decay min(d, (1 + t) / (10 + t)) at step t."""
    t = tf.cast(step, tf.float32)
    return tf.minimum(decay, (1.0 + t) / (10.0 + t))


def update(
    shadows: Sequence, variables: Sequence, decay: float, step: tf.Tensor, apply: tf.Tensor
) -> None:
    """Moves each shadow towards its variable where `apply` is True.

    Args:
      shadows: The EMA variables, one per trainable variable.
      variables: The trainable variables, just updated.
      decay: The EMA decay d in [0, 1).
      step: The number of updates released before this one.
      apply: A scalar bool: whether this micro-batch released an update.
    """
    rate = decay_at(decay, step)
    for shadow, v in zip(shadows, variables):
        shadow.assign(tf.where(apply, rate * shadow + (1.0 - rate) * v, shadow))


@contextlib.contextmanager
def swapped_in(variables: Sequence, shadows: Sequence):
    """Context manager: `variables` hold the `shadows`' values inside the block.

    The variables get their own values back on exit, also on an exception.
    """
    backup = [tf.identity(per_example.tf_variable(v)) for v in variables]
    for v, shadow in zip(variables, shadows):
        v.assign(shadow)
    try:
        yield
    finally:
        for v, saved in zip(variables, backup):
            v.assign(saved)
