"""Random views of one image in numpy: the augmentation policies without TensorFlow.

The JAX backend's training program draws each example's K views on the host,
one example at a time (`example_source.ImageViews`), with the same policies
as `augment.make_augmenter` on TensorFlow: "digits" (1-pixel zero padding and
a random crop: a translation, no flip), "cifar" (4-pixel reflect padding, a
random crop, a horizontal flip with probability 1/2) and "none". Every view
is an exact window of the padded image (integer offsets, no resampling).
"""

from typing import Sequence, Tuple

import numpy as np

from tan_keras import _repeated_rows, _validate
from tan_keras.data.policies import PADDING, POLICIES

# What needs TensorFlow's image ops (JPEG decoding, colour jitter).
_TENSORFLOW_ONLY = ("imagenet",)


def check_policy(policy: str, image_shape: Sequence[int]) -> Tuple[int, str, bool]:
    """(pad, mode, flip) of a policy for images of `image_shape`, checked.

    Args:
      policy: One of `POLICIES` but "imagenet".
      image_shape: (H, W, C) of the images.

    Returns:
      The padding in pixels, "REFLECT" or "CONSTANT", and whether views are
      flipped.

    Raises:
      ValueError: naming `augment` for an unknown policy, one that needs
        TensorFlow, or images too small to reflect-pad.
    """
    _validate.one_of("augment", policy, POLICIES)
    if policy in _TENSORFLOW_ONLY:
        raise _validate.invalid(
            "augment",
            f"one of {[p for p in POLICIES if p not in _TENSORFLOW_ONLY]} on the JAX backend "
            "(colour jitter and JPEG decoding need TensorFlow)",
            policy,
        )
    if policy == "none":
        return 0, "CONSTANT", False
    pad, mode = PADDING[policy]
    if mode == "REFLECT" and min(image_shape[0], image_shape[1]) <= pad:
        raise _validate.invalid(
            "augment",
            f"a policy that fits images of shape {tuple(image_shape)} (reflect padding "
            f"needs height and width > {pad})",
            policy,
        )
    return pad, mode, policy != "digits"


def views(
    image: np.ndarray, count: int, pad: int, mode: str, flip: bool, rng: np.random.Generator
) -> np.ndarray:
    """`count` random views of one image: pad, crop back to its size, maybe flip.

    Args:
      image: [H, W, C].
      count: K, the number of views.
      pad: Pixels of padding on each side (0: the image itself, K times).
      mode: "REFLECT" (edge not repeated) or "CONSTANT" (zeros).
      flip: Whether each view is mirrored with probability 1/2.
      rng: The generator of the draws.

    Returns:
      [K, H, W, C] float32.
    """
    image = np.asarray(image, np.float32)
    if pad == 0:
        return np.repeat(image[np.newaxis], count, axis=0)
    height, width = image.shape[:2]
    padded = np.pad(
        image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect" if mode == "REFLECT" else "constant"
    )
    tops = rng.integers(0, 2 * pad + 1, size=count)
    lefts = rng.integers(0, 2 * pad + 1, size=count)
    flipped = rng.random(count) < 0.5 if flip else np.zeros(count, bool)
    out = np.empty((count,) + image.shape, np.float32)
    for k in range(count):
        window = padded[tops[k] : tops[k] + height, lefts[k] : lefts[k] + width]
        out[k] = window[:, ::-1] if flipped[k] else window
    return out


class AugmentedImages:
    """A random-access source of images, each returned as K fresh random views.

    `source[i]` is `(views of image i [K, H, W, C], label i)` ([H, W, C]
    when K = 1), drawn anew at
    every call: what the JAX `DPKerasModel.fit` takes instead of arrays
    (`jax_dp/example_source.py`), so that every Poisson step sees new views.

    Args:
      images: [N, H, W, C] floats.
      labels: [N, ...] labels.
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
        (`tan_keras/_repeated_rows.py`); or "distinct_people".

    Raises:
      ValueError: for mismatched rows, a bad K or policy, a repeated example.
    """

    def __init__(
        self,
        images,
        labels,
        augmult: int,
        policy: str,
        seed: int = 0,
        repeated_rows: str = _repeated_rows.REFUSE,
    ):
        self._images = np.asarray(images)
        self._labels = np.asarray(labels)
        if self._images.ndim != 4 or len(self._images) != len(self._labels):
            raise _validate.invalid(
                "images",
                f"[N, H, W, C] images with one label each ({len(self._labels)} labels)",
                f"shape {self._images.shape}",
            )
        self._augmult = _validate.positive_int("augmult", augmult)
        self._pad, self._mode, self._flip = check_policy(policy, self._images.shape[1:])
        self._seed = _validate.integer("seed", seed, low=0)
        _repeated_rows.check(self._images, self._labels, repeated_rows)
        # How many times each example was asked for: its own draws only.
        self._calls = np.zeros(len(self._images), np.int64)

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int):
        index = int(index)
        image = self._images[index]
        rng = np.random.default_rng((self._seed, index, int(self._calls[index])))
        self._calls[index] += 1
        drawn = views(image, self._augmult, self._pad, self._mode, self._flip, rng)
        # One view is the image's own shape: the model takes [N, K, ...] only for K > 1.
        return (drawn if self._augmult > 1 else drawn[0]), self._labels[index]
