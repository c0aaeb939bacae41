"""Tests of the model zoo: shapes, sizes, no BatchNorm, WSConv2D's algebra."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tan_keras import _keras_internals, models
from tan_keras.models import WSConv2D


@pytest.fixture(scope="module")
def nf_resnet():
    # Built once: 25.6M parameters. 64x64 inputs keep the forward pass cheap;
    # the parameter count does not depend on the image size.
    return models.nf_resnet50(input_shape=(64, 64, 3), num_classes=1000)


@pytest.fixture(scope="module")
def wrn16_4():
    return models.build_model("wrn16_4", (32, 32, 3), 10)


def _assert_dp_friendly(model):
    assert not any(
        isinstance(layer, keras.layers.BatchNormalization)
        for layer in _keras_internals.all_layers(model)
    )
    # Nothing updated from data: every weight is trained by the optimizer.
    assert model.non_trainable_weights == []


@pytest.mark.parametrize("input_shape", [(8, 8, 1), (32, 32, 3), (28, 28, 1)])
def test_small_cnn_shapes_and_size(input_shape):
    model = models.build_model("small_cnn", input_shape, 10)
    logits = model(np.zeros((2, *input_shape), np.float32))
    assert logits.shape == (2, 10)
    assert 2_000 <= model.count_params() <= 30_000
    _assert_dp_friendly(model)


def test_wrn16_4_matches_the_tan_model(wrn16_4):
    # 2,751,562 with conv biases, as in TAN's PyTorch WideResNet-16-4.
    assert 2_700_000 <= wrn16_4.count_params() <= 2_800_000
    assert wrn16_4(np.zeros((1, 32, 32, 3), np.float32)).shape == (1, 10)
    _assert_dp_friendly(wrn16_4)
    norms = [
        layer for layer in wrn16_4.layers if isinstance(layer, keras.layers.GroupNormalization)
    ]
    assert norms and all(layer.groups == 16 for layer in norms)


def test_wrn_blocks_put_relu_before_groupnorm(wrn16_4):
    # Every GroupNorm inside a block reads a ReLU (the TAN / De et al. order).
    for layer in wrn16_4.layers:
        if isinstance(layer, keras.layers.GroupNormalization):
            source = layer.input._keras_history.operation
            assert isinstance(source, keras.layers.ReLU), layer.name


def test_wrn_init_is_fan_in_truncated_normal(wrn16_4):
    # 3*3*256 = 2304 inputs, 590k weights: the sample std is within ~0.2%.
    conv = wrn16_4.get_layer("stage3_block2_conv2")
    kernel = conv.kernel.numpy()
    np.testing.assert_allclose(kernel.std(), 1 / np.sqrt(2304), rtol=0.02)
    # Truncated at 2 standard deviations of the untruncated normal.
    assert np.abs(kernel).max() <= 2.0 * (1 / np.sqrt(2304)) / 0.8796 + 1e-6
    assert np.all(conv.bias.numpy() == 0)


def test_nf_resnet50_size_and_forward(nf_resnet):
    # ResNet-50's 25,557,032: gain + bias per conv channel replace BN's
    # gamma + beta one for one.
    assert 25_400_000 <= nf_resnet.count_params() <= 25_700_000
    logits = nf_resnet(np.random.default_rng(0).normal(size=(1, 64, 64, 3)).astype(np.float32))
    assert logits.shape == (1, 1000)
    assert np.all(np.isfinite(logits.numpy()))
    _assert_dp_friendly(nf_resnet)
    assert sum(isinstance(layer, WSConv2D) for layer in nf_resnet.layers) == 53


def test_models_can_be_rewrapped_functionally():
    model = models.build_model("small_cnn", (8, 8, 1), 10)
    rewrapped = keras.Model(inputs=model.inputs, outputs=model.outputs)
    x = np.random.default_rng(0).random((3, 8, 8, 1)).astype(np.float32)
    np.testing.assert_allclose(rewrapped(x).numpy(), model(x).numpy())


def test_build_model_parses_wrn_names():
    model = models.build_model("wrn10_1", (16, 16, 3), 5)
    assert model.name == "wrn10_1"
    assert model(np.zeros((1, 16, 16, 3), np.float32)).shape == (1, 5)


def test_model_names_are_registered():
    assert models.MODEL_NAMES == ("small_cnn", "wrn16_4", "nf_resnet50")


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: models.build_model("resnet18", (32, 32, 3), 10), "model"),
        (lambda: models.build_model("small_cnn", (8, 8), 10), "input_shape"),
        (lambda: models.build_model("small_cnn", (8, 0, 1), 10), "input_shape"),
        (lambda: models.build_model("small_cnn", (8, 8, 1), 0), "num_classes"),
        (lambda: models.wide_resnet(depth=15), "depth"),
        (lambda: models.wide_resnet(groups=3), "groups"),
        (lambda: models.nf_resnet50(alpha=0.0), "alpha"),
        (lambda: WSConv2D(4, 3, eps=0.0), "eps"),
    ],
)
def test_bad_arguments_are_refused(call, name):
    with pytest.raises(ValueError, match=f"Invalid value for `{name}`"):
        call()


def _ws_layer(gain):
    layer = WSConv2D(len(gain), 3, padding="same", bias_initializer="ones")
    layer.build((None, 6, 6, 5))
    layer.gain.assign(gain)
    return layer


def test_ws_kernel_is_standardized_per_output_channel():
    gain = np.array([1.0, 0.5, 2.0, 3.0], np.float32)
    layer = _ws_layer(gain)
    kernel = layer.standardized_kernel().numpy().reshape(-1, 4)
    fan_in = 3 * 3 * 5
    np.testing.assert_allclose(kernel.mean(axis=0), 0.0, atol=1e-6)
    # Variance 1/fan_in (so outputs keep unit variance), times gain^2.
    np.testing.assert_allclose(kernel.var(axis=0) * fan_in, gain**2, rtol=1e-3)


def test_ws_conv_convolves_with_the_standardized_kernel():
    layer = _ws_layer(np.array([1.0, 2.0], np.float32))
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 5)).astype(np.float32)
    expected = tf.nn.conv2d(x, layer.standardized_kernel(), 1, "SAME") + 1.0
    np.testing.assert_allclose(layer(x).numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_ws_conv_preserves_unit_variance():
    layer = WSConv2D(64, 3, padding="valid")
    x = tf.random.stateless_normal((8, 16, 16, 32), seed=(1, 2))
    # 8*14*14*64 outputs of variance 1 at init; sample variance within ~5%.
    np.testing.assert_allclose(float(tf.math.reduce_variance(layer(x))), 1.0, rtol=0.1)


def test_ws_conv_config_round_trip(tmp_path):
    layer = WSConv2D(3, 2, strides=2, eps=1e-3, gain_initializer="zeros", name="ws")
    clone = WSConv2D.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()

    inputs = keras.Input((4, 4, 2))
    model = keras.Model(inputs, WSConv2D(3, 2, name="ws")(inputs))
    model.get_layer("ws").gain.assign([0.5, 1.0, 2.0])
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.get_layer("ws"), WSConv2D)
    x = np.random.default_rng(0).random((1, 4, 4, 2)).astype(np.float32)
    np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), rtol=1e-6)
