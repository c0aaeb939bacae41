"""The ImageNet recipe's image operations in numpy and Pillow, without TensorFlow.

What the JAX backend's program runs on the host for `--augment=imagenet`:
decoding a JPEG to the 224 x 224 center crop of the image resized to a
shorter side of 256 (`decode_preprocess`, as `augment.imagenet_preprocess`),
and the colour jitter of 30% of the views (`color_jitter`, the definitions of
`augment.color_jitter`: torchvision's, in its fixed order). Both treat one
image at a time: nothing here sees two examples.
"""

import io

import numpy as np

from tan_keras import _validate
from tan_keras.data.policies import (
    IMAGENET_CROP,
    IMAGENET_RESIZE,
    JITTER_HUE,
    JITTER_PROB,
    JITTER_STRENGTH,
)

# tf.image.rgb_to_grayscale's weights (ITU-R 601), as `augment.color_jitter` uses.
_GRAY = np.array([0.2989, 0.5870, 0.1140], np.float32)


def decode_preprocess(
    jpeg: bytes, resize: int = IMAGENET_RESIZE, crop: int = IMAGENET_CROP
) -> np.ndarray:
    """One encoded image, its shorter side resized to `resize`, center-cropped to `crop`.

    The crop is computed alone (Pillow's resampling over the crop's box of
    the original, bilinear with antialiasing, as TensorFlow's
    ScaleAndTranslate in `augment.imagenet_preprocess`): the resized image
    is never formed, so a crafted 1 x 65000 JPEG costs a crop's work. A JPEG
    at least twice the resized size is decoded at a reduced DCT scale first
    (libjpeg's draft mode), still at least the resized size.

    Args:
      jpeg: The encoded bytes (JPEG; PNG and GIF decode too).
      resize: The shorter side after resizing.
      crop: The side of the square center crop (at most `resize`).

    Returns:
      float32 [crop, crop, 3] in [0, 1].

    Raises:
      ValueError: if `crop` > `resize` or either is not a positive integer.
    """
    from PIL import Image

    resize = _validate.positive_int("resize", resize)
    crop = _validate.integer(
        "crop", crop, low=1, high=resize, hint="The crop must fit in the resized image"
    )

    image = Image.open(io.BytesIO(jpeg))
    width, height = image.size
    scale = resize / min(width, height)
    # Round, and never below `resize`, so the crop always fits.
    new_width = max(int(round(width * scale)), resize)
    new_height = max(int(round(height * scale)), resize)
    image.draft("RGB", (new_width, new_height))
    image = image.convert("RGB")
    # (Draft mode may have decoded a smaller image: boxes are in its pixels.)
    x_scale, y_scale = image.size[0] / new_width, image.size[1] / new_height
    left, top = (new_width - crop) // 2, (new_height - crop) // 2
    box = (left * x_scale, top * y_scale, (left + crop) * x_scale, (top + crop) * y_scale)
    cropped = image.resize((crop, crop), Image.BILINEAR, box=box)
    return np.asarray(cropped, np.float32) / 255.0


def jitter_draws(rng: np.random.Generator, count: int) -> np.ndarray:
    """[count, 5]: for each view, whether it is jittered, then its four factors.

    Columns: applied (1.0 or 0.0, probability 0.3), brightness, contrast,
    saturation (uniform in [0.2, 1.8]), hue shift (uniform in [-0.2, 0.2]
    of a turn). Every view's draws are made, jittered or not.
    """
    low, high = 1.0 - JITTER_STRENGTH, 1.0 + JITTER_STRENGTH
    factors = rng.uniform(low, high, size=(count, 3))
    hue = rng.uniform(-JITTER_HUE, JITTER_HUE, size=(count, 1))
    applied = (rng.random((count, 1)) < JITTER_PROB).astype(np.float64)
    return np.concatenate([applied, factors, hue], axis=1)


def color_jitter(
    image: np.ndarray, brightness: float, contrast: float, saturation: float, hue: float
) -> np.ndarray:
    """torchvision's ColorJitter of one image with the given factors.

    Brightness, contrast and saturation multiply (contrast about the
    grayscale mean, saturation about each pixel's gray value), then the hue
    turns by `hue` of a turn in HSV; each step clipped to [0, 1].

    Args:
      image: float32 [H, W, 3] in [0, 1].
      brightness, contrast, saturation: The factors.
      hue: The hue shift, a fraction of a turn.

    Returns:
      float32 [H, W, 3] in [0, 1].
    """
    out = np.clip(image * np.float32(brightness), 0.0, 1.0)
    mean = np.float32((out @ _GRAY).mean())
    out = np.clip(mean + (out - mean) * np.float32(contrast), 0.0, 1.0)
    gray = (out @ _GRAY)[..., None]
    out = np.clip(gray + (out - gray) * np.float32(saturation), 0.0, 1.0)
    return np.clip(_rotate_hue(out, hue), 0.0, 1.0).astype(np.float32)


def _rotate_hue(rgb: np.ndarray, turn: float) -> np.ndarray:
    """The hue of every pixel turned by `turn` (HSV; value and saturation kept)."""
    # On contiguous channel planes, and with wrap-arounds as comparisons:
    # numpy's ops over a last axis of 3, masked writes and np.mod are each
    # several times slower.
    red, green, blue = np.moveaxis(rgb, -1, 0).reshape(3, -1).copy()
    value = np.maximum(np.maximum(red, green), blue)
    chroma = value - np.minimum(np.minimum(red, green), blue)
    inverse = np.divide(1.0, chroma, out=np.zeros_like(chroma), where=chroma > 0)
    # Hue in [0, 6): which channel is the largest, and where between the others.
    from_red = (green - blue) * inverse
    from_red += 6.0 * (from_red < 0)
    hue = np.where(
        value == red,
        from_red,
        np.where(value == green, (blue - red) * inverse + 2.0, (red - green) * inverse + 4.0),
    )
    hue *= chroma > 0
    hue += np.float32(6.0 * turn)
    hue += 6.0 * (hue < 0) - 6.0 * (hue >= 6.0)
    # HSV back to RGB: channel n is V - C * clip(min(k, 4 - k), 0, 1), k = (n + H) mod 6.
    out = np.empty((3, hue.size), np.float32)
    for row, n in enumerate((5.0, 3.0, 1.0)):
        k = hue + np.float32(n)
        k -= 6.0 * (k >= 6.0)
        np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0, out=k)
        out[row] = value - chroma * k
    return out.T.reshape(rgb.shape)
