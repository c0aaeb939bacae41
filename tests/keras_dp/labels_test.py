"""Invalid labels and float16: one policy on every route, with and without XLA.

Attack: a label outside [0, classes) used to crash the non-XLA step (at
whichever step first sampled it) while XLA silently zeroed it. Now the
example is dropped and counted on every route. float16 compute (which needs
loss scaling the DP step does not do) is refused; bfloat16 trains.
"""

import keras
import numpy as np
import pytest
from _helpers import LOSS, dense_model, flat, micro_batches, one_step

from tan_keras.keras_dp.dp_model import DPKerasModel

DP = dict(l2_norm_clip=0.1, noise_multiplier=0.0, expected_batch_size=8, dataset_size=100)
ROUTES = ["vectorized", "ghost", "layerwise"]


def _model(base, clipping, jit_compile, loss=LOSS):
    clone = keras.models.clone_model(base)
    clone.set_weights(base.get_weights())
    model = DPKerasModel(clone.inputs, clone.outputs, clipping=clipping, **DP)
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss, jit_compile=jit_compile)
    return model


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("clipping", ROUTES)
def test_an_out_of_range_label_is_dropped_and_counted(clipping, jit_compile):
    base = dense_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    y = rng.integers(0, 3, 8).astype(np.int32)
    bad = y.copy()
    bad[2], bad[5] = 7, -1
    model = _model(base, clipping, jit_compile)
    history = model.fit(
        micro_batches(x[None], bad[None], np.ones((1, 8)), [True], model), verbose=0
    )
    assert history.history["nonfinite_examples"][-1] == 2
    mask = np.ones(8)
    mask[[2, 5]] = 0
    want = one_step(_model(base, clipping, jit_compile), x, y, mask=mask)
    np.testing.assert_allclose(flat(model.get_weights()), flat(want), atol=1e-6)


def test_the_loss_name_and_function_forms_are_covered_too():
    base = dense_model()
    x = np.zeros((8, 4), np.float32)
    for loss in (
        "sparse_categorical_crossentropy",
        keras.losses.sparse_categorical_crossentropy,
    ):
        model = _model(base, "vectorized", False, loss=loss)
        history = model.fit(
            micro_batches(x[None], np.full((1, 8), 9), np.ones((1, 8)), [True], model), verbose=0
        )
        assert history.history["nonfinite_examples"][-1] == 8


@pytest.fixture
def policy():
    yield keras.mixed_precision.set_global_policy
    keras.mixed_precision.set_global_policy("float32")


def _mlp():
    inp = keras.Input((4,))
    hidden = keras.layers.Dense(5, activation="tanh")(inp)
    return inp, keras.layers.Dense(3, dtype="float32")(hidden)


def test_mixed_float16_is_refused_with_the_alternative(policy):
    policy("mixed_float16")
    inp, out = _mlp()
    with pytest.raises(ValueError, match="mixed_bfloat16"):
        DPKerasModel(inp, out, **DP)


def test_a_loss_scale_optimizer_is_refused():
    inp, out = _mlp()
    model = DPKerasModel(inp, out, **DP)
    optimizer = keras.mixed_precision.LossScaleOptimizer(keras.optimizers.SGD(0.1))
    with pytest.raises(ValueError, match="`optimizer`"):
        model.compile(optimizer=optimizer, loss=LOSS)


@pytest.mark.parametrize("clipping", ROUTES)
def test_mixed_bfloat16_trains_and_clips_like_float32(clipping, policy):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 4)).astype(np.float32), rng.integers(0, 3, 8)
    updates = {}
    for name in ("float32", "mixed_bfloat16"):
        policy(name)
        keras.utils.set_random_seed(0)
        inp, out = _mlp()
        model = DPKerasModel(inp, out, clipping=clipping, **DP)
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss=LOSS)
        start = flat(model.get_weights())
        updates[name] = flat(one_step(model, x, y)) - start
    # Every example is clipped (C = 0.1): each update is at most lr * C.
    assert np.linalg.norm(updates["mixed_bfloat16"]) <= 0.5 * 0.1 * (1 + 1e-3)
    np.testing.assert_allclose(updates["mixed_bfloat16"], updates["float32"], atol=2e-3)
