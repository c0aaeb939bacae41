"""A small CNN for tiny images (8x8 digits up to 32x32 CIFAR).

DP-SGD noise grows with the number of parameters relative to the signal, so
for ~1.4k training images (scikit-learn digits) the model stays near 10k
parameters. GroupNorm, not BatchNorm, keeps every example's gradient
independent of the rest of the batch.
"""

from typing import Sequence

import keras

from tan_keras import _validate
from tan_keras.models import _common

# Spatial size the features are pooled to before the classifier: keeps the
# Dense layer (and so the parameter count) the same for 8x8 and 32x32 inputs.
_HEAD_SIZE = 4


def small_cnn(
    input_shape: Sequence[int] = (8, 8, 1),
    num_classes: int = 10,
    groups: int = 4,
) -> keras.Model:
    """Builds Conv16-ReLU-GN -> Conv32/2-ReLU-GN -> pool to 4x4 -> Dense.

    ReLU comes before GroupNorm, the order that worked best for private
    training in TAN and De et al. (2022).

    Args:
      input_shape: (height, width, channels) of one image.
      num_classes: Number of output logits.
      groups: GroupNorm groups; must divide 16 (and so 32).

    Returns:
      A functional `keras.Model` mapping images to logits (no softmax).

    Raises:
      ValueError: if an argument is out of range.
    """
    height, width, _ = input_shape = _common.check_input_shape(input_shape)
    num_classes = _validate.positive_int("num_classes", num_classes)
    groups = _validate.positive_int("groups", groups)
    if 16 % groups:
        raise _validate.invalid("groups", "a positive integer dividing 16", groups)

    inputs = keras.Input(shape=input_shape, name="images")
    x = inputs
    for filters, strides in ((16, 1), (32, 2)):
        x = keras.layers.Conv2D(
            filters,
            3,
            strides=strides,
            padding="same",
            kernel_initializer=_common.fan_in_truncated_normal(),
        )(x)
        x = keras.layers.ReLU()(x)
        x = keras.layers.GroupNormalization(groups=groups)(x)
    # After the stride-2 conv the map is ceil(H/2) x ceil(W/2).
    pool = (max(1, -(-height // 2) // _HEAD_SIZE), max(1, -(-width // 2) // _HEAD_SIZE))
    if pool != (1, 1):
        x = keras.layers.AveragePooling2D(pool_size=pool)(x)
    x = keras.layers.Flatten()(x)
    logits = keras.layers.Dense(
        num_classes, kernel_initializer=_common.fan_in_truncated_normal(), name="logits"
    )(x)
    return keras.Model(inputs, logits, name="small_cnn")
