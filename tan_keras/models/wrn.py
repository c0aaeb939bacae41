"""WideResNet with GroupNorm, in the ordering used by TAN and De et al. (2022).

Inside every block the activation comes *before* the normalization
(ReLU -> GroupNorm -> Conv), which TAN found clearly better for DP-SGD than the
classic GroupNorm -> ReLU -> Conv. Convolutions and the classifier start from
a truncated normal with standard deviation 1/sqrt(fan_in) and zero biases.
WRN-16-4 with 16 groups is the CIFAR-10 model of the TAN recipe.
"""

from typing import Sequence

import keras

from tan_keras import _validate
from tan_keras.models import _common


def _conv(filters: int, kernel_size: int, strides: int, name: str) -> keras.layers.Layer:
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        kernel_initializer=_common.fan_in_truncated_normal(),
        bias_initializer="zeros",
        name=name,
    )


def _relu_norm(x: keras.KerasTensor, groups: int, name: str) -> keras.KerasTensor:
    x = keras.layers.ReLU(name=f"{name}_relu")(x)
    return keras.layers.GroupNormalization(groups=groups, name=f"{name}_gn")(x)


def _block(
    x: keras.KerasTensor, filters: int, strides: int, groups: int, name: str
) -> keras.KerasTensor:
    """Pre-activation basic block: two 3x3 convs plus an identity or 1x1 skip."""
    activated = keras.layers.ReLU(name=f"{name}_relu1")(x)
    out = keras.layers.GroupNormalization(groups=groups, name=f"{name}_gn1")(activated)
    out = _conv(filters, 3, strides, f"{name}_conv1")(out)
    out = _relu_norm(out, groups, f"{name}_2")
    out = _conv(filters, 3, 1, f"{name}_conv2")(out)
    if x.shape[-1] == filters and strides == 1:
        skip = x
    else:
        # The projection shares the block's ReLU but has its own GroupNorm.
        skip = keras.layers.GroupNormalization(groups=groups, name=f"{name}_skip_gn")(activated)
        skip = _conv(filters, 1, strides, f"{name}_skip_conv")(skip)
    return keras.layers.Add(name=f"{name}_add")([skip, out])


def wide_resnet(
    input_shape: Sequence[int] = (32, 32, 3),
    num_classes: int = 10,
    depth: int = 16,
    width: int = 4,
    groups: int = 16,
) -> keras.Model:
    """Builds a WideResNet-depth-width with GroupNorm.

    Args:
      input_shape: (height, width, channels) of one image.
      num_classes: Number of output logits.
      depth: Total depth; (depth - 4) must be divisible by 6 (16, 22, 28, ...).
      width: Widening factor k; the three stages have 16k, 32k, 64k channels.
      groups: GroupNorm groups; must divide 16 (the stem's channel count).

    Returns:
      A functional `keras.Model` mapping images to logits (no softmax).

    Raises:
      ValueError: if an argument is out of range.
    """
    input_shape = _common.check_input_shape(input_shape)
    num_classes = _validate.positive_int("num_classes", num_classes)
    depth = _validate.integer("depth", depth, low=10)
    if (depth - 4) % 6:
        raise _validate.invalid("depth", "an integer >= 10 with depth - 4 divisible by 6", depth)
    width = _validate.positive_int("width", width)
    groups = _validate.positive_int("groups", groups)
    if 16 % groups:
        raise _validate.invalid("groups", "a positive integer dividing 16", groups)
    blocks_per_stage = (depth - 4) // 6

    inputs = keras.Input(shape=input_shape, name="images")
    x = _conv(16, 3, 1, "stem_conv")(inputs)
    for stage, (filters, strides) in enumerate(((16 * width, 1), (32 * width, 2), (64 * width, 2))):
        for index in range(blocks_per_stage):
            x = _block(
                x,
                filters,
                strides if index == 0 else 1,
                groups,
                name=f"stage{stage + 1}_block{index + 1}",
            )
    x = _relu_norm(x, groups, "final")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    logits = keras.layers.Dense(
        num_classes,
        kernel_initializer=_common.fan_in_truncated_normal(),
        bias_initializer="zeros",
        name="logits",
    )(x)
    return keras.Model(inputs, logits, name=f"wrn{depth}_{width}")
