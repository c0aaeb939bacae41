"""The ImageNet recipe's image operations in numpy (the JAX backend's) against TensorFlow's.

The JAX program decodes with Pillow and jitters colours in numpy
(`data.imagenet_numpy`); the TensorFlow program with TensorFlow's ops
(`data.augment`). Both must be the same recipe: the jitter equal to
TensorFlow's ops for the same factors, the decoded crop equal to
TensorFlow's up to resampling, the jitter applied to 30% of the views.
"""

import io
import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tan_keras.data import augment, image_views, imagenet_numpy, policies


def _tf_jitter(image, brightness, contrast, saturation, hue):
    """`augment.color_jitter`'s steps for one image and given factors."""
    out = tf.clip_by_value(image * brightness, 0.0, 1.0)
    mean = tf.reduce_mean(tf.image.rgb_to_grayscale(out))
    out = tf.clip_by_value(mean + (out - mean) * contrast, 0.0, 1.0)
    gray = tf.image.rgb_to_grayscale(out)
    out = tf.clip_by_value(gray + (out - gray) * saturation, 0.0, 1.0)
    return tf.clip_by_value(tf.image.adjust_hue(out, hue), 0.0, 1.0).numpy()


def _images():
    rng = np.random.default_rng(0)
    images = rng.random((5, 24, 20, 3)).astype(np.float32)
    images[0] = images[0] ** 3  # dark
    images[1][:8] = 0.5  # gray: no hue
    images[2][:, :6, 1] = images[2][:, :6, 0]  # ties between channels
    return images


@pytest.mark.parametrize("hue", [-0.2, -0.07, 0.0, 0.13, 0.2])
def test_the_numpy_jitter_equals_tensorflows_ops(hue):
    rng = np.random.default_rng(1)
    for image in _images():
        factors = rng.uniform(0.2, 1.8, 3)
        ours = imagenet_numpy.color_jitter(image, *factors, hue)
        assert ours.dtype == np.float32 and ours.shape == image.shape
        np.testing.assert_allclose(ours, _tf_jitter(image, *factors, hue), atol=3e-6)


def test_a_jitter_in_another_order_or_with_other_gray_weights_is_told_apart():
    # Power check: the comparison above separates neighbouring definitions.
    image, factors, hue = _images()[3], (1.4, 0.5, 1.6), 0.1
    want = _tf_jitter(image, *factors, hue)
    swapped = imagenet_numpy.color_jitter(image, factors[0], factors[2], factors[1], hue)
    assert np.abs(swapped - want).max() > 1e-2
    weights = imagenet_numpy._GRAY
    try:
        imagenet_numpy._GRAY = np.full(3, 1 / 3, np.float32)
        other = imagenet_numpy.color_jitter(image, *factors, hue)
    finally:
        imagenet_numpy._GRAY = weights
    assert np.abs(other - want).max() > 1e-3


def _jpeg(width, height, seed=0):
    rng = np.random.default_rng(seed)
    coarse = rng.random((height // 20 + 2, width // 20 + 2, 3))
    image = Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


@pytest.mark.parametrize("size", [(500, 375), (333, 500), (256, 256), (1200, 900)])
def test_pillows_crop_equals_tensorflows_up_to_resampling(size):
    jpeg = _jpeg(*size)
    ours = imagenet_numpy.decode_preprocess(jpeg)
    theirs = augment.decode_imagenet(tf.constant(jpeg)).numpy()
    assert ours.shape == theirs.shape == (224, 224, 3) and ours.dtype == np.float32
    # Two JPEG decoders, two resampling kernels' roundings, uint8 output:
    # measured 1.16-1.26 levels of 255 apart on average, 7-9 at most.
    assert np.abs(ours - theirs).mean() < 1.5 / 255
    # Power check: the crop one pixel over is farther than that.
    shifted = np.abs(ours[:, 1:] - theirs[:, :-1]).mean()
    assert shifted > 2 * np.abs(ours - theirs).mean()


def test_a_long_thin_image_costs_a_crops_work():
    # A 1 x 20000 image: its resized version (256 x 5.1M) is never formed.
    image = Image.new("RGB", (20000, 1), (200, 10, 10))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    out = imagenet_numpy.decode_preprocess(buffer.getvalue())
    assert out.shape == (224, 224, 3)
    np.testing.assert_allclose(out[100, 100], np.array([200, 10, 10]) / 255, atol=2 / 255)


def _jittered(views, image):
    """How many views are not an exact window (mirrored or not) of the padded image."""
    pad = policies.PADDING["imagenet"][0]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    height, width = image.shape[:2]
    windows = np.lib.stride_tricks.sliding_window_view(padded, (height, width, 3))[..., 0, :, :, :]
    windows = windows.reshape(-1, height, width, 3)
    exact = {np.ascontiguousarray(w).tobytes() for w in windows}
    exact |= {np.ascontiguousarray(w[:, ::-1]).tobytes() for w in windows}
    return sum(np.ascontiguousarray(view).tobytes() not in exact for view in views)


def test_the_imagenet_policy_jitters_three_views_in_ten():
    image = np.random.default_rng(2).random((24, 24, 3)).astype(np.float32)
    policy = image_views.check_policy("imagenet", image.shape)
    assert policy.jitter and policy.flip and policy.pad == 20
    views = image_views.views(image, 400, policy, np.random.default_rng(3))
    assert views.shape == (400, 24, 24, 3) and 0.0 <= views.min() and views.max() <= 1.0
    # Binomial(400, 0.3): 120 +- 4 * 9.2.
    assert abs(_jittered(views, image) - 120) < 4 * math.sqrt(400 * 0.3 * 0.7)
    # Power check: the CIFAR policy (no jitter) has every view a window.
    cifar = image_views.views(image, 40, policy._replace(jitter=False), np.random.default_rng(3))
    assert _jittered(cifar, image) == 0


def test_the_imagenet_policy_needs_rgb_images():
    with pytest.raises(ValueError, match="augment.*3 channels"):
        image_views.check_policy("imagenet", (32, 32, 1))


@pytest.mark.parametrize("resize, crop, name", [(0, 224, "resize"), (256, 300, "crop")])
def test_sizes_that_cannot_crop_are_refused_by_name(resize, crop, name):
    with pytest.raises(ValueError, match=f"Invalid value for `{name}`"):
        imagenet_numpy.decode_preprocess(_jpeg(300, 300), resize=resize, crop=crop)
