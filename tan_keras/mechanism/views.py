"""The K augmented views of an example (augmentation multiplicity).

With augmentation multiplicity each sampled example is expanded into K random
views and its gradient is the average of the K view gradients, clipped once.
The views stay grouped by example, [batch, K, ...], so no later stage can
mistake them for batch * K distinct examples (which would under-count the
privacy cost by a factor K).

An augmenter sees one example at a time, by construction: whatever it does
with the batch it is given (blend images as mix-up does, normalize by the
batch's statistics), it cannot carry one example's data into another's
views, which would reach that other example's clipped gradient unbounded.
Only the augmenters of `tan_keras.make_augmenter`, which the package owns and
knows to be per image (`register_per_image`), get the whole micro-batch in
one call, for speed. Augmenters that only exist to blend examples (Keras's
MixUp and CutMix) are refused, and so are Keras augmenters holding
preprocessing state adapted on data (`provenance.py`): both would carry one
example into the others' views (`check_augmenter`).
"""

import inspect
import weakref
from typing import Any, Callable, NamedTuple, Optional

import keras
import tensorflow as tf

from tan_keras import _keras_internals, _validate
from tan_keras.mechanism import data_copies, model_analysis, provenance

Augmenter = Callable[[tf.Tensor], tf.Tensor]

# An image's id: example index << 16 | view << 8 | draw. Up to 256 views per
# example and 256 random draws per view (an augmenter's `ViewKeys.offset`).
_VIEW_SHIFT, _EXAMPLE_SHIFT = 8, 16
MAX_VIEWS = 1 << (_EXAMPLE_SHIFT - _VIEW_SHIFT)
# An augmenter with this attribute set to True takes `ViewKeys` as its seed.
TAKES_VIEW_KEYS = "takes_view_keys"
# Augmenters made by the package and known to treat each image alone.
_PER_IMAGE = weakref.WeakSet()
# Layers that exist to blend the examples of a batch (Keras's and KerasCV's
# names): as an augmenter they would mix examples, called per example they
# would do nothing.
_BATCH_MIXING = frozenset({"MixUp", "CutMix", "FourierMix", "Mosaic"})
# SplitMix64's finalizer (Steele, Lea, Flood 2014): a bijective 64-bit mix.
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _mix(z: tf.Tensor) -> tf.Tensor:
    for shift, factor in ((30, _MIX1), (27, _MIX2)):
        z = tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, tf.constant(shift, tf.uint64)))
        z = z * tf.constant(factor, tf.uint64)
    return tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, tf.constant(31, tf.uint64)))


class ViewKeys(NamedTuple):
    """Per-image keys: every random draw of an image is a function of its key only.

    The Poisson pipeline keys image (example i, view v) of step t by the
    step's secret key and (i, v): a resumed run draws the same views, and
    hosts that hold the same example draw the same views, whatever the
    micro-batch, shard or row it lands in. An augmenter draws its d-th value
    for each image from `offset(d).uniform()` (d < 256).

    Attributes:
      key: [2] int64, the step's key (derived from the sampler's secret key).
      ids: [rows] int64, each image's id (example << 16 | view << 8 | draw).
    """

    key: tf.Tensor
    ids: tf.Tensor

    def offset(self, draw: Any) -> "ViewKeys":
        """The keys of each image's `draw`-th value (0 <= draw < 256)."""
        return ViewKeys(self.key, self.ids + tf.cast(draw, tf.int64))

    def uniform(self) -> tf.Tensor:
        """[rows] float64 in [0, 1): one uniform value per image, from its key alone."""
        words = tf.bitcast(tf.cast(self.key, tf.int64), tf.uint64)
        z = _mix(tf.bitwise.bitwise_xor(tf.bitcast(self.ids, tf.uint64), words[0]))
        z = _mix(tf.bitwise.bitwise_xor(z, words[1]))
        # The top 53 bits: every float64 in [0, 1) on a 2^-53 grid.
        return tf.cast(tf.bitwise.right_shift(z, tf.constant(11, tf.uint64)), tf.float64) * 2.0**-53


def view_keys(key: tf.Tensor, example_ids: tf.Tensor, augmult: int) -> ViewKeys:
    """The `ViewKeys` of each example's K views, example-major ([i0 v0, i0 v1, ...]).

    Args:
      key: [2] int64 key of the step.
      example_ids: [batch] int64 indices of the examples in the dataset.
      augmult: K, at most `MAX_VIEWS`.

    Returns:
      `ViewKeys` of the batch * K images, in the order `make_views` augments them.
    """
    ids = tf.cast(example_ids, tf.int64)[:, None] * (1 << _EXAMPLE_SHIFT)
    views = tf.range(augmult, dtype=tf.int64)[None, :] * (1 << _VIEW_SHIFT)
    return ViewKeys(tf.cast(key, tf.int64), tf.reshape(ids + views, [-1]))


def register_per_image(augmenter: Augmenter) -> Augmenter:
    """Marks a package-made augmenter as per image: it may get the whole batch in one call."""
    _PER_IMAGE.add(augmenter)
    return augmenter


def check_augmenter(augmenter: Optional[Augmenter]) -> None:
    """Refuses an augmenter that exists to blend the examples of a batch.

    Raises:
      ValueError: naming `augmenter`, for Keras's MixUp or CutMix (alone or
        inside a Sequential or other layer), saying what to use instead.
    """
    if augmenter is None:
        return
    layers = (
        _keras_internals.all_layers(augmenter, include_self=True)
        if isinstance(augmenter, keras.layers.Layer)
        else [augmenter]
    )
    for layer in layers:
        if type(layer).__name__ in _BATCH_MIXING:
            raise _validate.invalid(
                "augmenter",
                "an augmentation of one example at a time",
                type(layer).__name__,
                "It blends the examples of a batch, so one example's data would reach other "
                "examples' clipped gradients. Use per-image augmentations "
                "(tan_keras.make_augmenter, or Keras's random image layers) and augmentation "
                "multiplicity (augmult=K) instead",
            )
    if tf.executing_eagerly():
        # A Normalization adapted on the training set inside an augmenter,
        # or called by an augmenter function, carries every example's data
        # into all the others' views. (Read eagerly: pipelines call this
        # when they are built.)
        try:
            provenance.check(augmenter)
        except ValueError as err:
            raise ValueError(f"Invalid value for `augmenter`: {err}") from None


def check_augmenter_state(augmenter: Optional[Augmenter], example: Any, augmult: int) -> None:
    """Refuses an augmenter that writes state (a running mean in a `tf.Variable`).

    Called on one example's K copies at a time, an augmenter that updates a
    variable carries each example into every later one's views, across
    steps, unclipped. Random state (Keras's random layers, `tf.random.Generator`)
    holds no data and passes. The package's own augmenters are not traced.

    Args:
      augmenter: The augmenter, or None.
      example: One example's features (tensors or specs, without the batch axis).
      augmult: K.

    Raises:
      ValueError: naming `augmenter` and the variable it writes.
    """
    if augmenter is None or augmenter in _PER_IMAGE or not tf.executing_eagerly():
        return
    copies = tf.nest.map_structure(lambda t: tf.TensorSpec([augmult, *t.shape], t.dtype), example)
    if _takes_seed(augmenter):
        specs = (copies, tf.TensorSpec([2], tf.int64))
        function = lambda c, s: augmenter(c, seed=s)  # noqa: E731
    else:
        specs, function = (copies,), augmenter
    written = model_analysis.function_writes(function, *specs)
    # A pool of training examples it closes over (to blend with) is refused.
    try:
        provenance.discover_adapted()
        data_copies.check_function(function, *specs, where="The augmenter")
    except ValueError as err:
        raise ValueError(f"Invalid value for `augmenter`: {err}") from None
    if written:
        raise _validate.invalid(
            "augmenter",
            "an augmentation that keeps no state between examples",
            f"one that {written[0]}",
            "Called on one example at a time, it would carry each example's data into the "
            "views of every later one, unclipped. Compute statistics beforehand (from "
            "public data) and pass them as constants",
        )


def make_views(
    images: tf.Tensor,
    augmult: int,
    augmenter: Augmenter,
    seed: Optional[tf.Tensor] = None,
    example_ids: Optional[tf.Tensor] = None,
) -> tf.Tensor:
    """Draws `augmult` independent augmented views of every image.

    Args:
      images: [batch, H, W, C] (or a structure of [batch, ...] features).
      augmult: K >= 1, the augmentation multiplicity.
      augmenter: Function from `make_augmenter`, or any `images -> images`.
        Any augmenter not made by `make_augmenter` is called once per
        example, on that example's K copies ([K, H, W, C]), so that it
        cannot mix examples.
      seed: Optional stateless [2] seed, passed on to an augmenter that takes
        a `seed` argument (one from `make_augmenter` does).
      example_ids: Optional [batch] indices of the examples: then an
        augmenter marked with `TAKES_VIEW_KEYS` (those of `make_augmenter`)
        gets `ViewKeys`, each view keyed by (`seed`, example, view); any other
        augmenter gets a [2] seed folded with its example's index. Without
        them, examples are numbered by their row.

    Returns:
      [batch, K, H, W, C]; row i holds the K views of image i (K = 1 still
      has the views axis, so callers handle one layout).

    Raises:
      ValueError: if `augmult` is not an integer in [1, `MAX_VIEWS`], or the
        augmenter blends examples (`check_augmenter`).
    """
    augmult = _validate.integer("augmult", augmult, low=1, high=MAX_VIEWS)
    check_augmenter(augmenter)
    images = tf.nest.map_structure(tf.convert_to_tensor, images)
    batch = tf.nest.flatten(images)[0].shape[0]
    if augmenter in _PER_IMAGE:
        views = _one_call(images, augmult, augmenter, seed, example_ids)
    else:
        views = _per_example(images, augmult, augmenter, seed, example_ids)

    def grouped(t):
        out_shape = tf.concat([[-1, augmult], tf.shape(t)[2:]], axis=0)
        return tf.ensure_shape(tf.reshape(t, out_shape), [batch, augmult, *t.shape[2:]])

    return tf.nest.map_structure(grouped, views)


def _one_call(images, augmult, augmenter, seed, example_ids):
    """A per-image augmenter on the [batch * K] copies at once: [batch, K, ...]."""
    if example_ids is not None and seed is not None:
        if getattr(augmenter, TAKES_VIEW_KEYS, False):
            seed = view_keys(seed, example_ids, augmult)
        else:
            seed = tf.random.experimental.stateless_fold_in(
                tf.cast(seed, tf.int64), tf.cast(example_ids[0], tf.int64)
            )
    repeated = tf.nest.map_structure(lambda t: tf.repeat(t, augmult, axis=0), images)
    views = (
        augmenter(repeated, seed=seed)
        if seed is not None and _takes_seed(augmenter)
        else (augmenter(repeated))
    )
    return tf.nest.map_structure(
        lambda t: tf.reshape(t, tf.concat([[-1, augmult], tf.shape(t)[1:]], 0)), views
    )


def _per_example(images, augmult, augmenter, seed, example_ids):
    """Any other augmenter, called on one example's K copies at a time: [batch, K, ...].

    A loop over the examples (`tf.map_fn`): each call sees one example, and
    a stateful augmenter (Keras's random layers) draws anew for each.
    """
    first = tf.nest.flatten(images)[0]
    ids = (
        tf.range(tf.shape(first)[0], dtype=tf.int64)
        if example_ids is None
        else tf.cast(example_ids, tf.int64)
    )
    takes_seed = seed is not None and _takes_seed(augmenter)

    @tf.autograph.experimental.do_not_convert
    def one_example(args):
        example, example_id = args
        copies = tf.nest.map_structure(lambda t: tf.repeat(t[None], augmult, axis=0), example)
        if not takes_seed:
            return augmenter(copies)
        if getattr(augmenter, TAKES_VIEW_KEYS, False):
            return augmenter(copies, seed=view_keys(seed, example_id[None], augmult))
        # Each example its own draws, the same whichever micro-batch or host
        # holds it (a resumed run draws the same views).
        example_seed = tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), example_id)
        return augmenter(copies, seed=example_seed)

    # The first example's call outside the loop gives the output's shape
    # and type (an augmenter may crop or cast).
    head = one_example(tf.nest.map_structure(lambda t: t[0], (images, ids)))
    rest = tf.map_fn(
        one_example,
        tf.nest.map_structure(lambda t: t[1:], (images, ids)),
        fn_output_signature=tf.nest.map_structure(tf.TensorSpec.from_tensor, head),
    )
    return tf.nest.map_structure(lambda h, r: tf.concat([h[None], r], axis=0), head, rest)


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
    example_ids: Optional[tf.Tensor] = None,
) -> tf.Tensor:
    """The views a training micro-batch carries for its sampled images.

    Args:
      images: [batch, H, W, C].
      augmult: K >= 1.
      augmenter: One-view augmentation, or None for K identical views.
      seed: Stateless [2] seed for the augmenter (see `make_views`).
      example_ids: Optional [batch] example indices keying each view (see
        `make_views`).

    Returns:
      [batch, K, H, W, C], except [batch, H, W, C] when K = 1 without an
      augmenter (nothing to group).

    Raises:
      ValueError: if `augmult` is not an integer in [1, `MAX_VIEWS`].
    """
    augmult = _validate.integer("augmult", augmult, low=1, high=MAX_VIEWS)
    if augmenter is not None:
        return make_views(images, augmult, augmenter, seed=seed, example_ids=example_ids)
    if augmult > 1:
        return tf.nest.map_structure(
            lambda t: tf.repeat(tf.expand_dims(t, 1), augmult, axis=1), images
        )
    return images
