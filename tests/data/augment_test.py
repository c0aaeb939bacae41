"""Tests of augmentation: exact crops, horizontal flips, K grouped views."""

import numpy as np
import pytest
import tensorflow as tf

from tan_keras.data import augment
from tan_keras.mechanism.views import make_views


def _images(batch, size=8, channels=3, seed=0):
    return np.random.default_rng(seed).random((batch, size, size, channels)).astype(np.float32)


def _windows(image, pad, mode, flips):
    """All size x size windows of the padded image (and of its mirror)."""
    size = image.shape[0]
    padded = np.pad(image, [(pad, pad), (pad, pad), (0, 0)], mode=mode)
    sources = [padded, padded[:, ::-1]] if flips else [padded]
    return [
        src[top : top + size, left : left + size]
        for src in sources
        for top in range(2 * pad + 1)
        for left in range(2 * pad + 1)
    ]


def _matches_a_window(view, windows):
    return any(np.array_equal(view, window) for window in windows)


@pytest.mark.parametrize("policy", augment.POLICIES)
def test_shapes_and_range(policy):
    size = 24 if policy == "imagenet" else 8
    images = _images(4, size)
    views = make_views(images, 3, augment.make_augmenter(policy, images.shape[1:], seed=0))
    assert views.shape == (4, 3, size, size, 3) and views.dtype == tf.float32
    assert float(tf.reduce_min(views)) >= 0.0 and float(tf.reduce_max(views)) <= 1.0


def test_none_is_identity():
    images = _images(2)
    views = make_views(images, 2, augment.make_augmenter("none", (8, 8, 3)))
    np.testing.assert_array_equal(views.numpy(), np.stack([images, images], axis=1))


def test_cifar_views_are_reflect_padded_crops_with_horizontal_flips():
    image = _images(1)
    views = make_views(image, 16, augment.make_augmenter("cifar", (8, 8, 3), seed=3))
    views = views.numpy()[0]
    windows = _windows(image[0], 4, "reflect", flips=True)
    assert all(_matches_a_window(view, windows) for view in views)
    # The K views of one image are independent draws (81 * 2 possible views).
    assert len({view.tobytes() for view in views}) > 8
    # 16 fair coins: the chance that none flips is 2^-16.
    unflipped = _windows(image[0], 4, "reflect", flips=False)
    assert not all(_matches_a_window(view, unflipped) for view in views)


def test_digits_views_are_translations_without_flips():
    image = _images(1, channels=1)
    views = make_views(image, 16, augment.make_augmenter("digits", (8, 8, 1), seed=4))
    windows = _windows(image[0], 1, "constant", flips=False)
    assert all(_matches_a_window(view, windows) for view in views.numpy()[0])


def test_views_stay_grouped_by_image():
    # Two very different images: each row of views must come from its image.
    images = np.stack([np.zeros((8, 8, 3)), np.ones((8, 8, 3))]).astype(np.float32)
    views = make_views(images, 4, augment.make_augmenter("cifar", (8, 8, 3), seed=0))
    np.testing.assert_array_equal(views.numpy()[0], 0.0)
    np.testing.assert_array_equal(views.numpy()[1], 1.0)


def test_k_equal_one_keeps_the_views_axis():
    views = make_views(_images(3), 1, augment.make_augmenter("cifar", (8, 8, 3)))
    assert views.shape == (3, 1, 8, 8, 3)


def test_works_inside_dataset_map():
    augmenter = augment.make_augmenter("imagenet", (24, 24, 3), seed=0)
    dataset = tf.data.Dataset.from_tensor_slices(_images(4, 24)).batch(2)
    dataset = dataset.map(lambda batch: make_views(batch, 3, augmenter))
    shapes = [tuple(batch.shape) for batch in dataset]
    assert shapes == [(2, 3, 24, 24, 3), (2, 3, 24, 24, 3)]


def test_color_jitter_changes_about_30_percent_of_images():
    images = tf.constant(_images(400, 4))
    out = augment.color_jitter(images, seed=0).numpy()
    changed = np.any(np.abs(out - images.numpy()) > 1e-6, axis=(1, 2, 3)).mean()
    # Binomial(400, 0.3): std 2.3%; +-10% is > 4 std.
    assert 0.2 <= changed <= 0.4
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_imagenet_preprocess_center_crops():
    image = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    out = augment.imagenet_preprocess(image).numpy()
    # Already 256 on the shorter side: the crop is the central 224 x 224.
    np.testing.assert_allclose(out, image[16:240, 16:240] / 255.0, atol=1e-5)
    assert augment.imagenet_preprocess(np.zeros((300, 500, 3), np.uint8)).shape == (
        224,
        224,
        3,
    )


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: augment.make_augmenter("autoaugment", (8, 8, 3)), "policy"),
        (lambda: augment.make_augmenter("cifar", (8, 8)), "image_shape"),
        (lambda: augment.make_augmenter("imagenet", (32, 32, 1)), "image_shape"),
        (lambda: augment.make_augmenter("imagenet", (16, 16, 3)), "image_shape"),
        (lambda: make_views(_images(1), 0, lambda x: x), "augmult"),
        (lambda: make_views(_images(1), 1.5, lambda x: x), "augmult"),
        (lambda: augment.imagenet_preprocess(np.zeros((8, 8, 3)), 100, 224), "crop"),
    ],
)
def test_bad_arguments_are_refused(call, name):
    with pytest.raises(ValueError, match=f"Invalid value for `{name}`"):
        call()


def test_a_stateless_seed_fixes_the_views():
    aug = augment.make_augmenter("imagenet", (32, 32, 3))
    images = tf.random.stateless_uniform([6, 32, 32, 3], seed=[1, 2])
    seed = tf.constant([3, 4], tf.int64)
    first = make_views(images, 2, aug, seed=seed).numpy()
    again = make_views(images, 2, aug, seed=seed).numpy()
    other = make_views(images, 2, aug, seed=tf.constant([3, 5], tf.int64)).numpy()
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 0.1
    # Power check: without a seed the draws are stateful and change.
    assert np.abs(aug(images).numpy() - aug(images).numpy()).max() > 0.1


def test_poisson_pipeline_views_resume_exactly_and_differ_across_shards():
    from tan_keras.mechanism import sampling

    n, b = 40, 8
    x = np.random.default_rng(0).random((n, 8, 8, 1)).astype(np.float32)
    y = np.zeros(n, np.int32)
    aug = augment.make_augmenter("digits", (8, 8, 1))

    def views(start, steps, shards=1, shard=0, images=x):
        sampler = sampling.PoissonSampler(n, b, physical_batch_size=8, secret_key=99)
        sampler.resume_at(start)
        ds = sampling.make_poisson_dataset(
            images,
            y,
            sampler,
            steps=steps,
            augmult=2,
            augmenter=aug,
            num_shards=shards,
            shard_index=shard,
            repeated_rows="distinct_people",  # (one image for all, on purpose)
        )
        return [element[0].numpy() for element in ds]

    straight = views(0, 4)
    resumed = views(2, 2)
    assert resumed
    for a, b_ in zip(straight[-len(resumed) :], resumed):
        np.testing.assert_array_equal(a, b_)
    # Views are keyed by example: with every example the same image, two
    # hosts' rows (other examples) still get their own draws.
    same = np.repeat(x[:1], n, axis=0)
    host0 = views(0, 1, shards=2, shard=0, images=same)
    host1 = views(0, 1, shards=2, shard=1, images=same)
    assert host0[0].shape == host1[0].shape
    assert not np.array_equal(host0[0], host1[0])


def test_imagenet_preprocess_equals_resizing_then_center_cropping():
    rng = np.random.default_rng(2)
    for height, width in [(375, 500), (500, 333), (7, 300), (257, 300), (100, 90)]:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        scale = 256 / min(height, width)
        size = [max(round(height * scale), 256), max(round(width * scale), 256)]
        resized = tf.image.resize(image, size, method="bilinear", antialias=True) / 255.0
        top, left = (size[0] - 224) // 2, (size[1] - 224) // 2
        want = np.clip(resized[top : top + 224, left : left + 224].numpy(), 0.0, 1.0)
        got = augment.imagenet_preprocess(image).numpy()
        np.testing.assert_allclose(got, want, atol=3e-5, err_msg=str((height, width)))
    # A crafted 1 x 65000 image: resized whole it would take 51 GB; only
    # the crop is computed.
    thin = augment.imagenet_preprocess(rng.integers(0, 256, (1, 65000, 3), dtype=np.uint8))
    assert thin.shape == (224, 224, 3) and np.isfinite(thin.numpy()).all()


def test_decode_imagenet_gives_rgb_for_grayscale_and_rgba_images():
    # ImageNet holds some grayscale JPEGs; a PNG may carry alpha. Both must
    # come out [224, 224, 3] (a model input of 1 or 4 channels would fail).
    gray = np.random.default_rng(3).integers(0, 256, (300, 260, 1), dtype=np.uint8)
    out = augment.decode_imagenet(tf.io.encode_jpeg(gray)).numpy()
    assert out.shape == (224, 224, 3)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])  # gray in all three
    rgba = np.concatenate([np.repeat(gray, 3, axis=-1), np.zeros_like(gray)], axis=-1)
    out = augment.decode_imagenet(tf.io.encode_png(rgba)).numpy()
    assert out.shape == (224, 224, 3) and out.any()  # alpha dropped, not applied


@pytest.mark.parametrize(
    "pad, mode, flip", [(20, "REFLECT", True), (4, "REFLECT", False), (1, "CONSTANT", False)]
)
def test_pad_crop_flip_equals_padding_cropping_and_flipping_in_turn(pad, mode, flip):
    images = tf.constant(np.random.default_rng(0).random((6, 32, 28, 3)), tf.float32)
    seed = tf.constant([5, 7], tf.int64)
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode=mode)
    want = augment.random_crop(padded, 32, 28, seed=seed)
    if flip:
        want = augment.random_flip_left_right(want, seed=augment._op_seed(seed, 10))
    got = augment.pad_crop_flip(images, pad, mode, flip, seed=seed)
    np.testing.assert_array_equal(got.numpy(), want.numpy())


def _jitter_reference(images, seed):
    """Every image jittered by the torchvision formulas (HSV round trip), then selected."""
    batch = images.shape[0]

    def draw(offset, low, high):
        return augment._uniform([batch], low, high, tf.float32, augment._op_seed(seed, offset))

    per = lambda v: v[:, None, None, None]  # noqa: E731
    out = tf.clip_by_value(images * per(draw(0, 0.2, 1.8)), 0.0, 1.0)
    mean = tf.reduce_mean(tf.image.rgb_to_grayscale(out), axis=[1, 2, 3], keepdims=True)
    out = tf.clip_by_value(mean + (out - mean) * per(draw(1, 0.2, 1.8)), 0.0, 1.0)
    gray = tf.image.rgb_to_grayscale(out)
    out = tf.clip_by_value(gray + (out - gray) * per(draw(2, 0.2, 1.8)), 0.0, 1.0)
    hsv = tf.image.rgb_to_hsv(out)
    hue = tf.math.floormod(hsv[..., :1] + per(draw(3, -0.2, 0.2)), 1.0)
    out = tf.clip_by_value(tf.image.hsv_to_rgb(tf.concat([hue, hsv[..., 1:]], -1)), 0.0, 1.0)
    return tf.where(per(draw(4, 0.0, 1.0) < 0.3), out, images)


def test_color_jitter_equals_the_torchvision_formulas_on_the_chosen_images():
    images = tf.constant(np.random.default_rng(1).random((40, 12, 12, 3)), tf.float32)
    seed = tf.constant([3, 4], tf.int64)
    got = augment.color_jitter(images, seed=seed).numpy()
    want = _jitter_reference(images, seed).numpy()
    changed = np.any(got != images.numpy(), axis=(1, 2, 3))
    assert 4 <= changed.sum() <= 24  # about 30% of 40
    np.testing.assert_allclose(got, want, atol=2e-6)
