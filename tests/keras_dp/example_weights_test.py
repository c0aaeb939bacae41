"""sample_weight weighs each example's loss before clipping; class_weight is refused.

Keras's meaning is kept (a weight of 2 counts an example twice, 0 leaves it
out) and so is DP: the weighted gradient is still clipped to C, so a weight
of 100 moves the update by no more than lr * C / B. A class-weight table is
refused (review 5): computed from the training label counts, one example's
label moves every other example's weight.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from _helpers import LOSS, dense_model, dp_model, flat, micro_batches

B = 8
DP = dict(l2_norm_clip=1e6, noise_multiplier=0.0, expected_batch_size=B, dataset_size=100)


def _data(seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(B, 4)).astype(np.float32), rng.integers(0, 3, B).astype(np.int32)


def _plain_weighted_update(base, x, y, weights, lr=0.1):
    plain = keras.models.clone_model(base)
    plain.set_weights(base.get_weights())
    plain.compile(optimizer=keras.optimizers.SGD(lr), loss=LOSS)
    plain.train_on_batch(x, y, sample_weight=weights)
    return flat(plain.trainable_variables)


def _shuffled_step(base, x, y, weights, **kwargs):
    model = dp_model(base, **{**DP, "sampling": "shuffled", "dataset_size": B, **kwargs})
    model.fit(x, y, sample_weight=weights, batch_size=B, epochs=1, shuffle=False, verbose=0)
    return flat(model.trainable_variables)


def _micro_batch_step(model, x, y, class_weight):
    ds = micro_batches(x[None], y[None], np.ones((1, B)), [True], model)
    model.fit(ds, class_weight=class_weight, epochs=1, verbose=0)


@pytest.mark.parametrize("clipping", ["vectorized", "ghost", "layerwise"])
def test_sample_weights_scale_each_loss_like_keras(clipping):
    base = dense_model()
    x, y = _data()
    weights = np.array([2.0, 0.5, 1.0, 0.0, 3.0, 1.0, 1.0, 0.25], np.float32)
    got = _shuffled_step(base, x, y, weights, clipping=clipping)
    np.testing.assert_allclose(got, _plain_weighted_update(base, x, y, weights), atol=1e-5)
    # Power check: the weights matter (an inclusion mask would give this).
    as_mask = (weights > 0).astype(np.float32)
    assert not np.allclose(got, _plain_weighted_update(base, x, y, as_mask), atol=1e-4)


def test_a_heavy_weight_is_still_clipped_to_c():
    base = dense_model()
    x, y = _data()
    start = flat(base.trainable_variables)
    lr, clip = 0.1, 0.01
    weights = np.zeros(B, np.float32)
    weights[0] = 100.0
    moved = _shuffled_step(base, x, y, weights, l2_norm_clip=clip) - start
    assert np.linalg.norm(moved) <= lr * clip / B * (1 + 1e-5)
    assert np.linalg.norm(moved) >= lr * clip / B * (1 - 1e-3)  # it did move, clipped


@pytest.mark.parametrize("class_weight", [{0: 3.0, 2: 0.5}, {0: 1.0}, {-1: 1.0}, {}])
def test_class_weight_is_refused_before_any_update(class_weight):
    base = dense_model()
    x, y = _data()
    model = dp_model(base, **DP)
    with pytest.raises(ValueError, match=r"Invalid value for `class_weight`: expected None"):
        _micro_batch_step(model, x, y, class_weight)
    assert int(model.dp_steps.numpy()) == 0
    np.testing.assert_array_equal(flat(model.trainable_variables), flat(base.trainable_variables))


def test_power_check_the_same_step_without_class_weight_trains():
    base = dense_model()
    x, y = _data()
    model = dp_model(base, **DP)
    _micro_batch_step(model, x, y, None)
    assert int(model.dp_steps.numpy()) == 1
    np.testing.assert_allclose(
        flat(model.trainable_variables), _plain_weighted_update(base, x, y, None), atol=1e-5
    )


@pytest.mark.parametrize("one_hot", [False, True])
def test_a_sample_weight_looked_up_by_label_is_refused_like_class_weight(one_hot):
    # keras.io's recipe spelled out: sample_weight = (1 / counts)[y].
    base = dense_model()
    x, y = _data()
    weights = (1.0 / np.bincount(y, minlength=3))[y].astype(np.float32)
    labels = np.eye(3, dtype=np.float32)[y] if one_hot else y
    model = dp_model(base, **{**DP, "sampling": "shuffled", "dataset_size": B})
    if one_hot:
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="categorical_crossentropy")
    with pytest.raises(ValueError, match=r"Invalid value for `sample_weight`: expected weights"):
        model.fit(x, labels, sample_weight=weights, batch_size=B, epochs=1, verbose=0)
    assert int(model.dp_steps.numpy()) == 0


def test_power_check_a_class_left_out_or_weights_within_a_class_train():
    # A 0/1 weight per class (a class left out) is no table of counts, and
    # weights that differ within a class are each example's own.
    base = dense_model()
    x, y = _data()
    for weights in ((y != 1).astype(np.float32), np.linspace(0.5, 2.0, B).astype(np.float32)):
        moved = _shuffled_step(base, x, y, weights) - flat(base.trainable_variables)
        assert np.abs(moved).max() > 0


def test_negative_sample_weight_is_refused():
    base = dense_model()
    x, y = _data()
    weights = np.ones(B, np.float32)
    weights[3] = -1.0
    with pytest.raises(tf.errors.InvalidArgumentError, match="`sample_weight`"):
        _shuffled_step(base, x, y, weights)
