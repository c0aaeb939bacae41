"""Random views of one image in numpy: the augmentation policies without TensorFlow.

The JAX backend's training program draws each example's K views on the host,
one example at a time (`AugmentedImages`), with the same policies as
`augment.make_augmenter` on TensorFlow: "digits" (1-pixel zero padding and
a random crop: a translation, no flip), "cifar" (4-pixel reflect padding, a
random crop, a horizontal flip with probability 1/2), "imagenet" (20-pixel
reflect padding, crop, flip, then the colour jitter of 30% of the views,
`imagenet_numpy.color_jitter`) and "none". Every view before the jitter is an
exact window of the padded image (integer offsets, no resampling).
"""

from typing import NamedTuple, Sequence

import numpy as np

from tan_keras import _repeated_rows, _validate
from tan_keras.data import imagenet_numpy
from tan_keras.data.policies import PADDING, POLICIES


class Policy(NamedTuple):
    """How a policy draws a view: padding, its mode, flips, colour jitter."""

    pad: int
    mode: str  # "REFLECT" (edge not repeated) or "CONSTANT" (zeros)
    flip: bool
    jitter: bool = False


def check_policy(policy: str, image_shape: Sequence[int]) -> Policy:
    """The `Policy` of a policy name for images of `image_shape`, checked.

    Args:
      policy: One of `POLICIES`.
      image_shape: (H, W, C) of the images.

    Returns:
      The policy's padding, mode, flips and jitter.

    Raises:
      ValueError: naming `augment` for an unknown policy, images too small to
        reflect-pad, or "imagenet" on images that are not RGB.
    """
    _validate.one_of("augment", policy, POLICIES)
    if policy == "none":
        return Policy(0, "CONSTANT", False)
    pad, mode = PADDING[policy]
    if mode == "REFLECT" and min(image_shape[0], image_shape[1]) <= pad:
        raise _validate.invalid(
            "augment",
            f"a policy that fits images of shape {tuple(image_shape)} (reflect padding "
            f"needs height and width > {pad})",
            policy,
        )
    jitter = policy == "imagenet"
    if jitter and image_shape[-1] != 3:
        raise _validate.invalid(
            "augment",
            f"a policy that fits images of shape {tuple(image_shape)} (the colour jitter "
            "needs 3 channels)",
            policy,
        )
    return Policy(pad, mode, policy != "digits", jitter)


def views(image: np.ndarray, count: int, policy: Policy, rng: np.random.Generator) -> np.ndarray:
    """`count` random views of one image: pad, crop back to its size, maybe flip and jitter.

    Args:
      image: [H, W, C].
      count: K, the number of views.
      policy: From `check_policy` (pad 0: the image itself, K times).
      rng: The generator of the draws.

    Returns:
      [K, H, W, C] float32.
    """
    image = np.asarray(image, np.float32)
    if policy.pad == 0:
        return np.repeat(image[np.newaxis], count, axis=0)
    pad = policy.pad
    height, width = image.shape[:2]
    padded = np.pad(
        image,
        ((pad, pad), (pad, pad), (0, 0)),
        mode="reflect" if policy.mode == "REFLECT" else "constant",
    )
    tops = rng.integers(0, 2 * pad + 1, size=count)
    lefts = rng.integers(0, 2 * pad + 1, size=count)
    flipped = rng.random(count) < 0.5 if policy.flip else np.zeros(count, bool)
    jitters = imagenet_numpy.jitter_draws(rng, count) if policy.jitter else None
    out = np.empty((count,) + image.shape, np.float32)
    for k in range(count):
        window = padded[tops[k] : tops[k] + height, lefts[k] : lefts[k] + width]
        out[k] = window[:, ::-1] if flipped[k] else window
        if jitters is not None and jitters[k, 0]:
            out[k] = imagenet_numpy.color_jitter(out[k], *jitters[k, 1:])
    return out


class AugmentedImages:
    """A random-access source of images, each returned as K fresh random views.

    `source[i]` is `(views of image i [K, H, W, C], label i)` ([H, W, C]
    when K = 1), drawn anew at
    every call: what the JAX `DPKerasModel.fit` takes instead of arrays
    (`jax_dp/example_source.py`), so that every Poisson step sees new views.

    Args:
      images: [N, H, W, C] floats: an array, or a lazy random-access view
        (ImageNet's `datasets.load_imagenet`: `shape`, `len`, `view[i]` ->
        one decoded image), read one example at a time.
      labels: [N, ...] labels (an array, or a lazy view like `images`).
      augmult: K >= 1 views per image.
      policy: The augmentation policy (`check_policy`).
      seed: Seed of the views' draws (they are not secret: which example a
        step holds is, and that is drawn by the model). The views of example
        i at its c-th call are drawn from (seed, i, c) alone: one shared
        generator would make every later example's views depend on which
        examples were drawn before, so that one example would change steps
        it is not in.
      repeated_rows: "refuse" (the default): images given twice with the
        same label are refused, since each copy would be sampled on its own
        (`tan_keras/_repeated_rows.py`); or "distinct_people", the caller's
        declaration, which lazy views need (their rows are not read whole
        to be compared).

    Raises:
      ValueError: for mismatched rows, a bad K or policy, a repeated example.
    """

    # Example i's views depend on (seed, i, its own calls) only, and a step
    # asks for each example once: its examples may be loaded by several
    # threads at once (`jax_dp/example_source.py`).
    LOADS_IN_PARALLEL = True

    def __init__(
        self,
        images,
        labels,
        augmult: int,
        policy: str,
        seed: int = 0,
        repeated_rows: str = _repeated_rows.REFUSE,
    ):
        # A view that reads its rows on access (ImageNet's): no `__array__`,
        # unlike numpy, JAX and TensorFlow arrays, which are compared as arrays.
        lazy = hasattr(images, "shape") and not hasattr(images, "__array__")
        self._images = images if lazy else np.asarray(images)
        lazy_labels = hasattr(labels, "shape") and not hasattr(labels, "__array__")
        self._labels = labels if lazy_labels else np.asarray(labels)
        shape = tuple(self._images.shape)
        if len(shape) != 4 or shape[0] != len(self._labels):
            raise _validate.invalid(
                "images",
                f"[N, H, W, C] images with one label each ({len(self._labels)} labels)",
                f"shape {shape}",
            )
        self._augmult = _validate.positive_int("augmult", augmult)
        self._policy = check_policy(policy, shape[1:])
        self._seed = _validate.integer("seed", seed, low=0)
        if lazy and repeated_rows != _repeated_rows.DISTINCT_PEOPLE:
            raise _validate.invalid(
                "repeated_rows",
                f"{_repeated_rows.DISTINCT_PEOPLE!r} with lazy images "
                f"({type(images).__name__}), declaring that each index is a different person",
                repeated_rows,
                "Their rows are decoded one at a time and not compared; a person held at "
                "several indices would be sampled more often than the epsilon reported",
            )
        _repeated_rows.check(
            None if lazy else self._images, None if lazy else self._labels, repeated_rows
        )
        # How many times each example was asked for: its own draws only.
        self._calls = np.zeros(len(self._images), np.int64)

    def __len__(self) -> int:
        return int(self._images.shape[0])

    def __getitem__(self, index: int):
        index = int(index)
        image = np.asarray(self._images[index], np.float32)
        rng = np.random.default_rng((self._seed, index, int(self._calls[index])))
        self._calls[index] += 1
        drawn = views(image, self._augmult, self._policy, rng)
        # One view is the image's own shape: the model takes [N, K, ...] only for K > 1.
        return (drawn if self._augmult > 1 else drawn[0]), self._labels[index]
