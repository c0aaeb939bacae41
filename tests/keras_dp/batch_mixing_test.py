"""Nothing outside the per-example computation sees two examples.

Attacks: a loss that mixes the rows of its batch (centering on the batch
mean) ran on the whole micro-batch on the layerwise route, which "auto" picks
under XLA: one added example moved the noiseless update by 2.9 lr*C/B. An
augmenter given the micro-batch could blend examples (mix-up) before
clipping, so one example's data reached the others' clipped gradients. Now
the loss and every augmenter the package does not own run on one example's
K views at a time, and Keras's MixUp/CutMix are refused as augmenters.
Power checks: the batched loss and the one-call augmenter fail the same tests.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from _helpers import dense_model, flat, one_step

import tan_keras
from tan_keras.keras_dp.dp_model import DPKerasModel
from tan_keras.mechanism import layerwise, sampling, views

B, LR, CLIP = 8, 0.5, 1.0


def _centering_loss(y_true, y_pred):
    """Squared distance of each prediction to the batch's mean prediction, plus its norm."""
    del y_true
    centered = y_pred - tf.reduce_mean(y_pred, axis=0, keepdims=True)
    return tf.reduce_sum(tf.square(centered), axis=-1) + tf.reduce_sum(tf.square(y_pred), -1)


def _update(clipping, jit_compile, with_attacker):
    base = dense_model(inputs=4, hidden=6, classes=3, seed=1)
    clone = keras.models.clone_model(base)
    clone.set_weights(base.get_weights())
    model = DPKerasModel(
        clone.inputs,
        clone.outputs,
        l2_norm_clip=CLIP,
        noise_multiplier=0.0,
        expected_batch_size=B,
        dataset_size=100,
        clipping=clipping,
    )
    model.compile(optimizer=keras.optimizers.SGD(LR), loss=_centering_loss, jit_compile=jit_compile)
    assert model.clipping == "layerwise"
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, 4)).astype(np.float32) * 0.1
    # The attacker: far from everyone, it moves the batch mean. Without it,
    # its row is padding (zeros, mask 0).
    x[0] = 300.0 if with_attacker else 0.0
    mask = np.ones(B, np.float32)
    mask[0] = float(with_attacker)
    start = flat(model.trainable_variables)
    return flat(one_step(model, x, np.zeros(B), mask)) - start


@pytest.mark.parametrize("clipping,jit_compile", [("layerwise", False), ("auto", True)])
def test_a_batch_mixing_loss_cannot_move_the_update_by_more_than_one_example(clipping, jit_compile):
    moved = np.linalg.norm(
        _update(clipping, jit_compile, True) - _update(clipping, jit_compile, False)
    )
    # The attacker's own clipped gradient moves it (by up to C), nothing else.
    assert 0.1 * LR * CLIP / B < moved <= LR * CLIP / B * (1 + 1e-4), moved / (LR * CLIP / B)


def test_power_check_the_loss_on_the_whole_batch_breaks_the_bound(monkeypatch):
    def batched(loss_fn, y, pred, batch, num_views):
        labels = tf.repeat(y, num_views, axis=0)
        per_view = tf.reshape(loss_fn(labels, pred), [batch, num_views])
        return tf.reduce_mean(per_view, axis=1)

    monkeypatch.setattr(layerwise, "_per_example_losses", batched)
    moved = np.linalg.norm(_update("layerwise", False, True) - _update("layerwise", False, False))
    assert moved > 1.5 * LR * CLIP / B


def _blend_with_the_batch(images):
    """A mix-up-like augmenter: each image half blended with the batch's mean image."""
    return 0.5 * images + 0.5 * tf.reduce_mean(images, axis=0, keepdims=True)


def _views_of_row_zero(augmenter, others, seed=None):
    rng = np.random.default_rng(others)
    images = rng.normal(size=(4, 6, 6, 1)).astype(np.float32)
    images[0] = 1.0  # the same example in both batches
    return views.make_views(images, 3, augmenter, seed=seed)[0].numpy()


def test_an_augmenter_sees_one_example_at_a_time():
    first = _views_of_row_zero(_blend_with_the_batch, others=1)
    second = _views_of_row_zero(_blend_with_the_batch, others=2)
    np.testing.assert_array_equal(first, second)


def test_power_check_one_call_on_the_batch_mixes_examples():
    blend = views.register_per_image(lambda images: _blend_with_the_batch(images))
    first = _views_of_row_zero(blend, others=1)
    second = _views_of_row_zero(blend, others=2)
    assert not np.allclose(first, second)


def test_a_keras_random_layer_draws_anew_for_every_example():
    augmenter = keras.Sequential(
        [keras.layers.RandomFlip("horizontal"), keras.layers.RandomTranslation(0.3, 0.3)]
    )
    images = np.tile(np.arange(36, dtype=np.float32).reshape(1, 6, 6, 1), (6, 1, 1, 1))
    out = views.make_views(images, 2, augmenter).numpy()
    assert out.shape == (6, 2, 6, 6, 1)
    differing = [not np.array_equal(out[i], out[0]) for i in range(1, 6)]
    assert sum(differing) >= 4, differing


@pytest.mark.parametrize(
    "augmenter",
    [
        keras.layers.MixUp(),
        keras.layers.CutMix(),
        keras.Sequential([keras.layers.RandomFlip(), keras.layers.MixUp()]),
    ],
    ids=["mixup", "cutmix", "inside_sequential"],
)
def test_batch_blending_augmenters_are_refused_before_any_work(augmenter):
    x = np.zeros((16, 6, 6, 1), np.float32)
    y = np.zeros(16, np.int32)
    sampler = sampling.PoissonSampler(16, 4)
    with pytest.raises(ValueError, match="`augmenter`.*blends the examples"):
        tan_keras.make_poisson_dataset(x, y, sampler, augmult=2, augmenter=augmenter)


def test_make_augmenter_keeps_its_one_call_and_its_keyed_views():
    augmenter = tan_keras.make_augmenter("cifar", (32, 32, 3))
    images = np.random.default_rng(0).random((4, 32, 32, 3)).astype(np.float32)
    seed = tf.constant([1, 2], tf.int64)
    ids = tf.constant([10, 11, 12, 13], tf.int64)
    whole = views.make_views(images, 2, augmenter, seed=seed, example_ids=ids).numpy()
    alone = views.make_views(images[2:3], 2, augmenter, seed=seed, example_ids=ids[2:3]).numpy()
    # Keyed by (step, example, view): the same views whatever else is in the batch.
    np.testing.assert_array_equal(whole[2], alone[0])


def test_an_augmenter_holding_statistics_adapted_on_the_data_is_refused():
    # keras.io's ViT pattern moved into augmenter=: the adapted mean and
    # variance carry every example into every other's views.
    x = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
    norm = keras.layers.Normalization()
    norm.adapt(x)
    augmenter = keras.Sequential([norm, keras.layers.GaussianNoise(0.1)])
    with pytest.raises(ValueError, match="`augmenter`.*Normalization.*adapt"):
        tan_keras.make_poisson_dataset(
            x, np.zeros(32), sampling.PoissonSampler(32, 4), augmult=2, augmenter=augmenter
        )
    # Declared public (or privately adapted), it is accepted.
    tan_keras.mark_public(norm, "adapted on a public proxy")
    tan_keras.make_poisson_dataset(
        x, np.zeros(32), sampling.PoissonSampler(32, 4), augmult=2, augmenter=augmenter
    )
