"""Builds the training program's models by name."""

from typing import Sequence

import keras

from tan_keras.models.cnn import small_cnn
from tan_keras.models.names import check_model_name, wrn_depth_width
from tan_keras.models.nf_resnet import nf_resnet50
from tan_keras.models.wrn import wide_resnet


def build_model(name: str, input_shape: Sequence[int], num_classes: int) -> keras.Model:
    """Builds a model by name.

    Args:
      name: One of `MODEL_NAMES`; besides "wrn16_4", any "wrn<depth>_<width>"
        (e.g. "wrn28_10") builds that WideResNet with 16 GroupNorm groups.
      input_shape: (height, width, channels) of one image.
      num_classes: Number of output logits.

    Returns:
      A functional `keras.Model` mapping images to logits.

    Raises:
      ValueError: if `name` is unknown or another argument is out of range.
    """
    wrn = wrn_depth_width(name)
    if wrn:
        return wide_resnet(input_shape, num_classes, depth=wrn[0], width=wrn[1])
    check_model_name(name)
    if name == "small_cnn":
        return small_cnn(input_shape, num_classes)
    return nf_resnet50(input_shape, num_classes)
