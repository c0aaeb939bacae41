"""Data augmentation for augmentation multiplicity (De et al. 2022, TAN).

With augmentation multiplicity each sampled example is expanded into K random
views and the *per-example* gradient is the average of the K view gradients,
clipped once. The views must therefore stay grouped by example:
`tan_keras.make_views` returns [batch, K, H, W, C], never a
flat [batch * K, ...] that a clipping step could mistake for batch * K
distinct examples (which would silently under-count the privacy cost by a
factor K).

All functions are pure TensorFlow and work eagerly and inside
`tf.data.Dataset.map`. Images are float in [0, 1], channels last.
"""

from typing import Callable, Optional, Sequence, Union

import tensorflow as tf

from tan_keras import _validate
from tan_keras.data.policies import (
    IMAGENET_CROP,
    IMAGENET_RESIZE,
    JITTER_HUE,
    JITTER_PROB,
    JITTER_STRENGTH,
    PADDING,
    POLICIES,
)
from tan_keras.mechanism.views import TAKES_VIEW_KEYS, ViewKeys, register_per_image

Augmenter = Callable[[tf.Tensor], tf.Tensor]


def _check_image_shape(image_shape: Sequence[int]):
    expected = "a (height, width, channels) tuple of positive integers"
    try:
        dims = tuple(int(_validate.positive_int("image_shape", d)) for d in image_shape)
    except (TypeError, ValueError):
        raise _validate.invalid("image_shape", expected, image_shape) from None
    if len(dims) != 3:
        raise _validate.invalid("image_shape", expected, image_shape)
    return dims


Seed = Union[None, int, tf.Tensor, ViewKeys]


def _op_seed(seed: Seed, offset: int) -> Seed:
    # Distinct seeds so that, e.g., crop offsets and jitter factors are not
    # drawn from the same stream: an op-level seed for the stateful ops, or a
    # stateless [2] seed folded with the offset.
    if seed is None:
        return None
    if isinstance(seed, int):
        return seed + offset
    if isinstance(seed, ViewKeys):
        return seed.offset(offset)
    return tf.random.experimental.stateless_fold_in(seed, offset)


def _uniform(shape, minval, maxval, dtype, seed: Seed) -> tf.Tensor:
    """Uniform draws: stateless when `seed` is a [2] tensor, else op-seeded.

    With `ViewKeys` (one key per image; `shape` is then [images]) each
    image's value depends on its own key only.
    """
    if seed is None or isinstance(seed, int):
        return tf.random.uniform(shape, minval, maxval, dtype, seed=seed)
    if isinstance(seed, ViewKeys):
        u = seed.uniform()
        low = tf.cast(minval, tf.float64)
        span = tf.cast(maxval, tf.float64) - low
        if dtype.is_integer:
            # floor(u * span) < span: maxval stays exclusive.
            return tf.cast(low + tf.floor(u * span), dtype)
        return tf.cast(low + u * span, dtype)
    return tf.random.stateless_uniform(shape, seed, minval, maxval, dtype)


def random_crop(images: tf.Tensor, height: int, width: int, seed: Seed = None) -> tf.Tensor:
    """Crops a random height x width window from each image independently.

    Every output is an exact window (integer offsets, no resampling), which
    is what TAN's reflect-pad-and-crop recipe means.

    Args:
      images: [batch, H, W, C] with H >= height and W >= width.
      height: Output height.
      width: Output width.
      seed: An op-level seed (int), a stateless [2] integer seed tensor, or None.

    Returns:
      [batch, height, width, C], each a window of the matching input.
    """
    shape = tf.shape(images)
    batch = shape[0]
    # maxval is exclusive, hence the + 1: every window position is possible.
    tops = _uniform([batch], 0, shape[1] - height + 1, tf.int32, seed=seed)
    lefts = _uniform([batch], 0, shape[2] - width + 1, tf.int32, seed=_op_seed(seed, 1))
    rows = tops[:, tf.newaxis] + tf.range(height)[tf.newaxis, :]
    cols = lefts[:, tf.newaxis] + tf.range(width)[tf.newaxis, :]
    images = tf.gather(images, rows, axis=1, batch_dims=1)
    return tf.gather(images, cols, axis=2, batch_dims=1)


def _reflect(index: tf.Tensor, size: int) -> tf.Tensor:
    """Indices into a row of `size` of a reflect-padded row (edge not repeated)."""
    index = tf.abs(index)
    return tf.where(index > size - 1, 2 * (size - 1) - index, index)


def pad_crop_flip(
    images: tf.Tensor, pad: int, mode: str, flip: bool, seed: Seed = None
) -> tf.Tensor:
    """`random_crop` of the `pad`-padded images, then `random_flip_left_right`.

    The same draws and the same output as padding with `tf.pad(mode=mode)`,
    cropping and flipping one after the other, without the padded and the
    flipped copies: the window's rows and columns (mirrored for a flipped
    image) are mapped back to the unpadded image and gathered once.

    Args:
      images: [batch, H, W, C].
      pad: Pixels of padding on each side (pad <= H - 1, W - 1 for REFLECT).
      mode: "REFLECT" or "CONSTANT" (zeros).
      flip: Whether to flip with probability 1/2.
      seed: As for `random_crop` (the flip draws from its offset 10).

    Returns:
      [batch, H, W, C].
    """
    shape = tf.shape(images)
    batch, height, width = shape[0], images.shape[1], images.shape[2]
    tops = _uniform([batch], 0, 2 * pad + 1, tf.int32, seed=seed)
    lefts = _uniform([batch], 0, 2 * pad + 1, tf.int32, seed=_op_seed(seed, 1))
    rows = tops[:, None] + tf.range(height)[None, :] - pad
    columns = tf.range(width)[None, :]
    if flip:
        flipped = _uniform([batch], 0.0, 1.0, tf.float32, seed=_op_seed(seed, 10)) < 0.5
        columns = tf.where(flipped[:, None], width - 1 - columns, columns)
    cols = lefts[:, None] + columns - pad
    if mode == "REFLECT":
        return tf.gather(
            tf.gather(images, _reflect(rows, height), axis=1, batch_dims=1),
            _reflect(cols, width),
            axis=2,
            batch_dims=1,
        )
    inside_rows = tf.logical_and(rows >= 0, rows < height)
    inside_cols = tf.logical_and(cols >= 0, cols < width)
    out = tf.gather(
        tf.gather(images, tf.clip_by_value(rows, 0, height - 1), axis=1, batch_dims=1),
        tf.clip_by_value(cols, 0, width - 1),
        axis=2,
        batch_dims=1,
    )
    inside = tf.logical_and(inside_rows[:, :, None], inside_cols[:, None, :])
    return tf.where(inside[..., None], out, tf.zeros_like(out))


def random_flip_left_right(images: tf.Tensor, seed: Seed = None) -> tf.Tensor:
    """Mirrors each image horizontally with probability 1/2, independently.

    Args:
      images: [batch, H, W, C].
      seed: An op-level seed (int), a stateless [2] integer seed tensor, or None.

    Returns:
      Images of the same shape: each is either unchanged or exactly mirrored.
    """
    flip = _uniform([tf.shape(images)[0]], 0.0, 1.0, tf.float32, seed=seed) < 0.5
    return tf.where(_per_image(flip), tf.reverse(images, axis=[2]), images)


def _per_image(values: tf.Tensor) -> tf.Tensor:
    return values[:, tf.newaxis, tf.newaxis, tf.newaxis]


def color_jitter(images: tf.Tensor, seed: Seed = None) -> tf.Tensor:
    """torchvision-style ColorJitter(0.8, 0.8, 0.8, 0.2) on 30% of the images.

    Each chosen image gets brightness, contrast and saturation multiplied by
    factors drawn uniformly in [0.2, 1.8] and its hue rotated by up to 0.2 of
    a turn, with per-image factors, in that fixed order (torchvision shuffles
    the order); the others are returned unchanged. Keras's RandomColorJitter
    defines brightness additively and saturation on another scale, so the
    torchvision definitions used by TAN are written out here.

    Args:
      images: [batch, H, W, 3] floats in [0, 1].
      seed: An op-level seed (int), a stateless [2] integer seed tensor, or None.

    Returns:
      Images of the same shape, still in [0, 1].
    """
    batch = tf.shape(images)[0]

    def factors(offset):
        return _uniform(
            [batch],
            1.0 - JITTER_STRENGTH,
            1.0 + JITTER_STRENGTH,
            tf.float32,
            seed=_op_seed(seed, offset),
        )

    brightness, contrast, saturation = factors(0), factors(1), factors(2)
    hue_shift = _uniform([batch], -JITTER_HUE, JITTER_HUE, tf.float32, seed=_op_seed(seed, 3))
    apply = _uniform([batch], 0.0, 1.0, tf.float32, seed=_op_seed(seed, 4)) < JITTER_PROB
    # Only the chosen 30% are jittered (the HSV round trip is most of an
    # ImageNet view's cost); every image's draws are made all the same.
    chosen = tf.where(apply)[:, 0]

    def pick(values):
        return _per_image(tf.gather(values, chosen))

    out = tf.clip_by_value(tf.gather(images, chosen) * pick(brightness), 0.0, 1.0)
    gray = tf.image.rgb_to_grayscale(out)
    mean = tf.reduce_mean(gray, axis=[1, 2, 3], keepdims=True)
    out = tf.clip_by_value(mean + (out - mean) * pick(contrast), 0.0, 1.0)
    gray = tf.image.rgb_to_grayscale(out)
    out = tf.clip_by_value(gray + (out - gray) * pick(saturation), 0.0, 1.0)
    # Hue rotated in HSV by a fraction of a turn, as torchvision does; the
    # fused AdjustHue kernel (one image and delta per call) is 1.6x faster
    # than the HSV round trip (16 images of 224 x 224 on one core) and equal
    # to it within 1e-6.
    out = tf.map_fn(
        lambda args: tf.image.adjust_hue(args[0], args[1]),
        (out, tf.gather(hue_shift, chosen)),
        fn_output_signature=tf.TensorSpec(out.shape[1:], tf.float32),
    )
    out = tf.clip_by_value(out, 0.0, 1.0)
    return tf.tensor_scatter_nd_update(images, chosen[:, None], out)


def make_augmenter(
    policy: str, image_shape: Sequence[int], seed: Optional[int] = None
) -> Augmenter:
    """Builds a function drawing one random view of each image in a batch.

    Policies:
      "none": identity.
      "digits": 1-pixel zero padding and random crop (a translation); no flip,
        digits are not mirror invariant.
      "cifar": 4-pixel reflect padding, random crop, horizontal flip (TAN
        CIFAR-10 recipe).
      "imagenet": 20-pixel reflect padding, random crop, horizontal flip, then
        `color_jitter` (TAN ImageNet recipe); resizing to 256 and the center
        crop to 224 belong to `imagenet_preprocess`, applied before.

    Args:
      policy: One of `POLICIES`.
      image_shape: (H, W, C) of the images the augmenter will receive.
      seed: Optional integer seed for reproducible draws.

    Returns:
      A function `augment(images, seed=None)` mapping images [batch, H, W, C]
      to images of the same shape and dtype float32, each augmented
      independently. With a [2] integer `seed` tensor its draws are
      stateless: a function of that seed only; with `ViewKeys` (what the
      Poisson pipeline passes) each image's draws are a function of its own
      key (the step's key, its example and view), so a resumed run and every
      host draw the same views; without, they come from stateful ops seeded
      by `seed` above.

    Raises:
      ValueError: if `policy` is unknown, `image_shape` is not three positive
        integers (too small to reflect-pad, or not RGB for "imagenet"), or
        `seed` is negative.
    """
    _validate.one_of("policy", policy, POLICIES)
    height, width, channels = _check_image_shape(image_shape)
    if seed is not None:
        seed = _validate.integer("seed", seed, low=0)
    if policy == "imagenet" and channels != 3:
        raise _validate.invalid("image_shape", "3 channels for the 'imagenet' policy", image_shape)
    if policy == "none":

        def identity(images, seed=None):
            del seed  # nothing random
            return tf.convert_to_tensor(images, tf.float32)

        return identity

    pad, mode = PADDING[policy]
    if mode == "REFLECT" and min(height, width) <= pad:
        raise _validate.invalid(
            "image_shape",
            f"height and width > {pad} for the {policy!r} policy (reflect padding)",
            image_shape,
        )
    flip = policy != "digits"
    base_seed = seed

    def augment(images, seed=None):
        if seed is None:
            draw = base_seed
        elif isinstance(seed, ViewKeys):
            draw = seed
        else:
            draw = tf.cast(seed, tf.int64)
        images = tf.convert_to_tensor(images, tf.float32)
        images = pad_crop_flip(images, pad, mode, flip, seed=draw)
        if policy == "imagenet":
            images = color_jitter(images, seed=_op_seed(draw, 20))
        return tf.ensure_shape(images, [None, height, width, channels])

    setattr(augment, TAKES_VIEW_KEYS, True)
    # Every op above treats each image alone (its own key, its own crop and
    # flip): the micro-batch may go through in one call.
    return register_per_image(augment)


def decode_imagenet(jpeg: tf.Tensor) -> tf.Tensor:
    """One JPEG-encoded ImageNet image, decoded and `imagenet_preprocess`ed.

    Args:
      jpeg: A scalar string tensor (JPEG bytes; PNG and GIF decode too).

    Returns:
      float32 [224, 224, 3] in [0, 1].
    """
    image = tf.io.decode_image(jpeg, channels=3, expand_animations=False)
    return imagenet_preprocess(image)


def imagenet_preprocess(
    image: tf.Tensor, resize: int = IMAGENET_RESIZE, crop: int = IMAGENET_CROP
) -> tf.Tensor:
    """Resizes the shorter side to `resize` and center-crops `crop` x `crop`.

    Args:
      image: One image [H, W, C], uint8 in [0, 255] or float in [0, 1].
      resize: Length of the shorter side after resizing.
      crop: Side of the square center crop.

    Returns:
      float32 [crop, crop, C] in [0, 1].

    Raises:
      ValueError: if `crop` > `resize` or either is not a positive integer.
    """
    resize = _validate.positive_int("resize", resize)
    crop = _validate.integer(
        "crop", crop, low=1, high=resize, hint="The crop must fit in the resized image"
    )
    image = tf.convert_to_tensor(image)
    # A uint8 image is resized as is (resizing is linear) and scaled to
    # [0, 1] after the crop: one pass over the full-size image fewer.
    scale_after = 1.0 / 255.0 if image.dtype == tf.uint8 else 1.0
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = resize / tf.reduce_min(shape)
    # Round, and never below `resize`, so the crop always fits.
    new_size = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), resize)
    top = (new_size[0] - crop) // 2
    left = (new_size[1] - crop) // 2
    # The crop of the resized image, computed alone: `tf.image.resize`
    # (bilinear, antialiased) is this op with translation 0 and the whole
    # new_size as output. The resized image itself is never formed: for a
    # crafted 1 x 65000 JPEG it would take 51 GB (256 x 16.6M x 3 floats).
    image = tf.raw_ops.ScaleAndTranslate(
        images=image[None],
        size=[crop, crop],
        scale=tf.cast(new_size, tf.float32) / shape,
        translation=-tf.cast(tf.stack([top, left]), tf.float32),
        kernel_type="triangle",
        antialias=True,
    )[0]
    image = tf.ensure_shape(image * scale_after, [crop, crop, None])
    return tf.clip_by_value(image, 0.0, 1.0)
