"""The layerwise fast path equals the generic per-example path."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tan_keras.mechanism import layerwise, per_example
from tan_keras.models import (
    build_model,
    layer_rules,  # noqa: F401  (WSConv2D's layerwise rule)
)
from tan_keras.models.ws_conv import WSConv2D

LOSS_FN = per_example.unreduced_loss_fn(
    keras.losses.SparseCategoricalCrossentropy(from_logits=True)
)
layers = keras.layers


def _model(kind):
    keras.utils.set_random_seed(2)
    if kind == "dense":
        inp = keras.Input((5,))
        out = layers.Dense(3)(layers.Dense(4, activation="tanh")(inp))
    elif kind == "dense_sequence":  # Dense on [batch, T, features]
        inp = keras.Input((3, 5))
        out = layers.Dense(3)(layers.Flatten()(layers.Dense(4, activation="relu")(inp)))
    elif kind == "conv_same_stride":
        inp = keras.Input((7, 7, 2))
        h = layers.Conv2D(4, 3, strides=2, padding="same", activation="relu")(inp)
        h = layers.GroupNormalization(groups=2)(h)
        out = layers.Dense(3)(layers.GlobalAveragePooling2D()(h))
    elif kind == "conv_valid_dilated":
        inp = keras.Input((8, 8, 2))
        h = layers.Conv2D(3, 3, dilation_rate=2, use_bias=False)(inp)
        out = layers.Dense(3)(layers.Flatten()(h))
    elif kind == "ws_conv":
        inp = keras.Input((6, 6, 2))
        h = WSConv2D(4, 3, padding="same")(inp)
        out = layers.Dense(3)(layers.Flatten()(layers.LayerNormalization()(h)))
    elif kind == "shared_layer":
        inp = keras.Input((4,))
        shared = layers.Dense(4, activation="tanh")
        out = layers.Dense(3)(shared(shared(inp)))
    elif kind == "small_cnn":
        return build_model("small_cnn", (8, 8, 1), 10)
    return keras.Model(inp, out)


def _inputs(model, batch, views, seed):
    rng = np.random.default_rng(seed)
    shape = tuple(model.inputs[0].shape[1:])
    x = rng.normal(size=(batch, views) + shape).astype(np.float32)
    classes = model.outputs[0].shape[-1]
    return tf.constant(x), tf.constant(rng.integers(0, classes, batch).astype(np.int32))


KINDS = [
    "dense",
    "dense_sequence",
    "conv_same_stride",
    "conv_valid_dilated",
    "ws_conv",
    "shared_layer",
    "small_cnn",
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch,views", [(1, 1), (5, 1), (3, 4)])
def test_equals_the_generic_path(kind, batch, views):
    model = _model(kind)
    assert layerwise.supports(model)
    x, y = _inputs(model, batch, views, seed=batch + views)
    fast, fast_losses, fast_preds = layerwise.per_example_gradients(model, LOSS_FN, x, y)
    slow, slow_losses, slow_preds = per_example.per_example_gradients(model, LOSS_FN, x, y)
    for variable, a, b in zip(model.trainable_variables, fast, slow):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5, err_msg=variable.name)
    np.testing.assert_allclose(fast_losses.numpy(), slow_losses.numpy(), atol=1e-5)
    np.testing.assert_allclose(fast_preds.numpy(), slow_preds.numpy(), atol=1e-5)


def test_unsupported_layers_are_detected():
    inp = keras.Input((4,), dtype="int32")
    out = layers.Dense(2)(layers.Flatten()(layers.Embedding(10, 3)(inp)))
    assert not layerwise.supports(keras.Model(inp, out))
    inp = keras.Input((6, 6, 4))
    out = layers.Flatten()(layers.Conv2D(4, 3, groups=2)(inp))
    assert not layerwise.supports(keras.Model(inp, out))


def test_dp_model_updates_agree_between_clipping_modes():
    from _helpers import updates_by_clipping_mode

    base = _model("conv_same_stride")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 2, 7, 7, 2)).astype(np.float32)
    y = rng.integers(0, 3, 6)
    dp = dict(l2_norm_clip=0.05, noise_multiplier=0.0, expected_batch_size=6, dataset_size=60)
    results = updates_by_clipping_mode(
        base, x, y, ("layerwise", "vectorized", "ghost"), augmult=2, **dp
    )
    np.testing.assert_allclose(results["layerwise"], results["vectorized"], atol=1e-6)
    np.testing.assert_allclose(results["ghost"], results["vectorized"], atol=1e-6)


def test_auto_picks_layerwise_under_xla_when_supported_and_refuses_impossible_layerwise():
    from tan_keras.keras_dp.dp_model import DPKerasModel

    dp = dict(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=2, dataset_size=10)
    base = _model("dense")
    for jit, expected in ((True, "layerwise"), (False, "ghost")):
        model = DPKerasModel(base.inputs, base.outputs, **dp)
        model.compile(optimizer="sgd", loss="mse", jit_compile=jit)
        assert model.clipping == expected
    inp = keras.Input((4,), dtype="int32")
    out = layers.Dense(2)(layers.Flatten()(layers.Embedding(10, 3)(inp)))
    model = DPKerasModel(inp, out, **dp)
    model.compile(optimizer="sgd", loss="mse", jit_compile=True)
    assert model.clipping == "ghost"
    with pytest.raises(ValueError, match="Invalid value for `clipping`"):
        DPKerasModel(inp, out, clipping="layerwise", **dp)
    with pytest.raises(ValueError, match="Invalid value for `clipping`"):
        DPKerasModel(base.inputs, base.outputs, clipping="bogus", **dp)


def test_shared_layer_norm_matches_the_generic_path():
    keras.utils.set_random_seed(4)
    inp = keras.Input((4,))
    norm = layers.LayerNormalization()
    model = keras.Model(inp, layers.Dense(3)(norm(layers.Dense(4)(norm(inp)))))
    assert layerwise.supports(model)
    x, y = _inputs(model, 3, 2, seed=0)
    fast, _, _ = layerwise.per_example_gradients(model, LOSS_FN, x, y)
    slow, _, _ = per_example.per_example_gradients(model, LOSS_FN, x, y)
    for a, b in zip(fast, slow):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
