"""sample_weight and class_weight weigh each example's loss before clipping.

Keras's meaning is kept (a weight of 2 counts an example twice, 0 leaves it
out) and so is DP: the weighted gradient is still clipped to C, so a weight
of 100 moves the update by no more than lr * C / B.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from _helpers import LOSS, dense_model, dp_model, flat, micro_batches

from tan_keras.keras_dp import example_weights

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


def _micro_batch_step(base, x, y, class_weight, **kwargs):
    model = dp_model(base, **{**DP, **kwargs})
    ds = micro_batches(x[None], y[None], np.ones((1, B)), [True], model)
    model.fit(ds, class_weight=class_weight, epochs=1, verbose=0)
    return flat(model.trainable_variables)


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


@pytest.mark.parametrize("clipping", ["vectorized", "ghost"])
def test_class_weight_equals_the_sample_weights_of_the_classes(clipping):
    base = dense_model()
    x, y = _data()
    class_weight = {0: 3.0, 2: 0.5}  # class 1 unlisted: weight 1, as in Keras
    got = _micro_batch_step(base, x, y, class_weight, clipping=clipping)
    weights = np.array([{0: 3.0, 1: 1.0, 2: 0.5}[int(c)] for c in y], np.float32)
    np.testing.assert_allclose(got, _plain_weighted_update(base, x, y, weights), atol=1e-5)


def test_a_new_class_weight_retraces_the_step():
    base = dense_model()
    x, y = _data()
    model = dp_model(base, **DP)
    ds = micro_batches(x[None], y[None], np.ones((1, B)), [True], model)
    model.fit(ds, class_weight={0: 1.0}, epochs=1, verbose=0)
    after_first = model.get_weights()
    model.fit(ds, class_weight={0: 10.0}, epochs=1, verbose=0)
    # The same second step on a fresh model from the same weights: a stale
    # trace (still weighting class 0 by 1) would give the first reference.
    references = {}
    for weight in (10.0, 1.0):
        fresh = dp_model(base, **DP)
        fresh.set_weights(after_first)
        fresh_ds = micro_batches(x[None], y[None], np.ones((1, B)), [True], fresh)
        fresh.fit(fresh_ds, class_weight={0: weight}, epochs=1, verbose=0)
        references[weight] = flat(fresh.trainable_variables)
    got = flat(model.trainable_variables)
    np.testing.assert_allclose(got, references[10.0], atol=1e-6)
    assert not np.allclose(references[10.0], references[1.0], atol=1e-4)  # power check


def test_negative_sample_weight_is_refused():
    base = dense_model()
    x, y = _data()
    weights = np.ones(B, np.float32)
    weights[3] = -1.0
    with pytest.raises(tf.errors.InvalidArgumentError, match="`sample_weight`"):
        _shuffled_step(base, x, y, weights)


@pytest.mark.parametrize(
    "class_weight", [{-1: 1.0}, {0: -2.0}, {0.5: 1.0}, {0: float("nan")}, [1.0, 2.0], {}]
)
def test_bad_class_weight_is_refused_by_name(class_weight):
    with pytest.raises(ValueError, match="Invalid value for `class_weight`"):
        example_weights.class_weight_table(class_weight)
