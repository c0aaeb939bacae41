"""Normalizer-Free ResNet-50 (Brock, De & Smith, ICLR 2021), the TAN ImageNet model.

Without BatchNorm, signal propagation is controlled analytically instead:

* every convolution is a `WSConv2D` (weight standardization + gain), so it
  preserves the variance of its input at initialization;
* activations are scaled by gamma = sqrt(2 / (1 - 1/pi)), which brings the
  output of a ReLU fed with N(0, 1) back to unit variance;
* block i sees an input of known variance beta_i^-2; its residual branch takes
  relu(x) * beta_i (unit variance in), is multiplied by alpha = 0.2 at the end
  and added to the skip, so the variance grows by alpha^2 per block and is
  reset to 1 + alpha^2 after each stage's first (projection) block.
"""

import math
from typing import Sequence

import keras

from tan_keras import _validate
from tan_keras.models import _common
from tan_keras.models.ws_conv import WSConv2D

# Std of relu(z), z ~ N(0, 1) is sqrt((1 - 1/pi) / 2); gamma undoes it.
RELU_GAMMA = math.sqrt(2.0 / (1.0 - 1.0 / math.pi))
ALPHA = 0.2
_STAGE_DEPTHS = (3, 4, 6, 3)  # ResNet-50
_STAGE_CHANNELS = (256, 512, 1024, 2048)
_BOTTLENECK_RATIO = 0.25


def _scaled_relu(x: keras.KerasTensor, scale: float, name: str) -> keras.KerasTensor:
    x = keras.layers.ReLU(name=f"{name}_relu")(x)
    return keras.layers.Rescaling(scale, name=f"{name}_scale")(x)


def _ws_conv(filters: int, kernel_size: int, strides: int, name: str) -> WSConv2D:
    return WSConv2D(filters, kernel_size, strides=strides, padding="same", name=name)


def _block(
    x: keras.KerasTensor, filters: int, strides: int, beta: float, alpha: float, name: str
) -> keras.KerasTensor:
    """Bottleneck block: 1x1 -> 3x3 (strided) -> 1x1, scaled by alpha."""
    mid = int(filters * _BOTTLENECK_RATIO)
    # beta folds into the activation's scale: relu(x * beta) == relu(x) * beta.
    out = _scaled_relu(x, RELU_GAMMA * beta, f"{name}_act1")
    skip = x
    if strides != 1 or x.shape[-1] != filters:
        # Average pooling then 1x1 (as in timm's nf_resnet50, used by TAN)
        # keeps all pixels, where a strided 1x1 conv would drop 3 in 4.
        shortcut = out
        if strides != 1:
            shortcut = keras.layers.AveragePooling2D(
                pool_size=2, strides=strides, padding="same", name=f"{name}_skip_pool"
            )(shortcut)
        skip = _ws_conv(filters, 1, 1, f"{name}_skip_conv")(shortcut)
    out = _ws_conv(mid, 1, 1, f"{name}_conv1")(out)
    out = _scaled_relu(out, RELU_GAMMA, f"{name}_act2")
    out = _ws_conv(mid, 3, strides, f"{name}_conv2")(out)
    out = _scaled_relu(out, RELU_GAMMA, f"{name}_act3")
    out = _ws_conv(filters, 1, 1, f"{name}_conv3")(out)
    out = keras.layers.Rescaling(alpha, name=f"{name}_alpha")(out)
    return keras.layers.Add(name=f"{name}_add")([skip, out])


def nf_resnet50(
    input_shape: Sequence[int] = (224, 224, 3),
    num_classes: int = 1000,
    alpha: float = ALPHA,
) -> keras.Model:
    """Builds NF-ResNet-50: ResNet-50 with weight-standardized convs, no BatchNorm.

    Args:
      input_shape: (height, width, channels) of one image. The network
        downsamples by 32 and pools globally, so smaller images (e.g. 64x64)
        also work.
      num_classes: Number of output logits.
      alpha: Scale of each residual branch before it is added to the skip.

    Returns:
      A functional `keras.Model` mapping images to logits (no softmax).

    Raises:
      ValueError: if an argument is out of range.
    """
    input_shape = _common.check_input_shape(input_shape)
    num_classes = _validate.positive_int("num_classes", num_classes)
    alpha = _validate.positive("alpha", alpha)

    inputs = keras.Input(shape=input_shape, name="images")
    x = _ws_conv(64, 7, 2, "stem_conv")(inputs)
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    expected_var = 1.0
    for stage, (depth, filters) in enumerate(zip(_STAGE_DEPTHS, _STAGE_CHANNELS)):
        for index in range(depth):
            # The stem already downsamples by 4, so stage 1 keeps its size.
            strides = 2 if index == 0 and stage > 0 else 1
            x = _block(
                x,
                filters,
                strides,
                beta=1.0 / math.sqrt(expected_var),
                alpha=alpha,
                name=f"stage{stage + 1}_block{index + 1}",
            )
            if index == 0:
                # The projection skip is computed from the unit-variance input.
                expected_var = 1.0
            expected_var += alpha**2
    x = _scaled_relu(x, RELU_GAMMA, "final_act")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    logits = keras.layers.Dense(
        num_classes,
        kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
        bias_initializer="zeros",
        name="logits",
    )(x)
    return keras.Model(inputs, logits, name="nf_resnet50")
