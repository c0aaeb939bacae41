"""The K augmented views of an example (augmentation multiplicity).

With augmentation multiplicity each sampled example is expanded into K random
views and its gradient is the average of the K view gradients, clipped once.
The views stay grouped by example, [batch, K, ...], so no later stage can
mistake them for batch * K distinct examples (which would under-count the
privacy cost by a factor K).
"""

import inspect
from typing import Callable, Optional

import tensorflow as tf

from tan_keras import _validate

Augmenter = Callable[[tf.Tensor], tf.Tensor]


def make_views(
    images: tf.Tensor, augmult: int, augmenter: Augmenter, seed: Optional[tf.Tensor] = None
) -> tf.Tensor:
    """Draws `augmult` independent augmented views of every image.

    Args:
      images: [batch, H, W, C].
      augmult: K >= 1, the augmentation multiplicity.
      augmenter: Function from `make_augmenter`, or any `images -> images`.
      seed: Optional stateless [2] seed, passed on to an augmenter that takes
        a `seed` argument (one from `make_augmenter` does).

    Returns:
      [batch, K, H, W, C]; row i holds the K views of image i (K = 1 still
      has the views axis, so callers handle one layout).

    Raises:
      ValueError: if `augmult` is not a positive integer.
    """
    augmult = _validate.positive_int("augmult", augmult)
    images = tf.nest.map_structure(tf.convert_to_tensor, images)
    # One augmenter call on [batch * K] images: each copy gets its own draw.
    repeated = tf.nest.map_structure(lambda t: tf.repeat(t, augmult, axis=0), images)
    if seed is not None and _takes_seed(augmenter):
        views = augmenter(repeated, seed=seed)
    else:
        views = augmenter(repeated)
    batch = tf.nest.flatten(images)[0].shape[0]

    def grouped(t):
        out_shape = tf.concat([[-1, augmult], tf.shape(t)[1:]], axis=0)
        return tf.ensure_shape(tf.reshape(t, out_shape), [batch, augmult, *t.shape[1:]])

    return tf.nest.map_structure(grouped, views)


def _takes_seed(augmenter) -> bool:
    try:
        return "seed" in inspect.signature(augmenter).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


def sampled_views(
    images: tf.Tensor,
    augmult: int,
    augmenter: Optional[Augmenter],
    seed: Optional[tf.Tensor] = None,
) -> tf.Tensor:
    """The views a training micro-batch carries for its sampled images.

    Args:
      images: [batch, H, W, C].
      augmult: K >= 1.
      augmenter: One-view augmentation, or None for K identical views.
      seed: Stateless [2] seed for the augmenter (see `make_views`).

    Returns:
      [batch, K, H, W, C], except [batch, H, W, C] when K = 1 without an
      augmenter (nothing to group).
    """
    if augmenter is not None:
        return make_views(images, augmult, augmenter, seed=seed)
    if augmult > 1:
        return tf.nest.map_structure(
            lambda t: tf.repeat(tf.expand_dims(t, 1), augmult, axis=1), images
        )
    return images
