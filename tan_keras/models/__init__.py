"""Models for private training: no BatchNorm anywhere.

Every model is a functional `keras.Model` built from `keras.Input` that
returns logits, so the training code can rewrap it as
`DPKerasModel(inputs=model.inputs, outputs=model.outputs)`. No layer keeps
state updated from data (BatchNorm would mix examples inside a batch and void
the per-example sensitivity bound of DP-SGD).
"""

import re
from typing import Sequence

import keras

from tan_keras import _validate
from tan_keras.models.cnn import small_cnn
from tan_keras.models.nf_resnet import nf_resnet50
from tan_keras.models.wrn import wide_resnet
from tan_keras.models.ws_conv import WSConv2D

MODEL_NAMES = ("small_cnn", "wrn16_4", "nf_resnet50")

# "wrn16_4", "wrn28_10", ...: any WideResNet depth and width.
_WRN_NAME = re.compile(r"wrn(\d+)_(\d+)")


def build_model(name: str, input_shape: Sequence[int], num_classes: int) -> keras.Model:
    """Builds a registered model by name.

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
    wrn = _WRN_NAME.fullmatch(name) if isinstance(name, str) else None
    if wrn:
        return wide_resnet(
            input_shape, num_classes, depth=int(wrn.group(1)), width=int(wrn.group(2))
        )
    _validate.one_of("model", name, MODEL_NAMES)
    if name == "small_cnn":
        return small_cnn(input_shape, num_classes)
    return nf_resnet50(input_shape, num_classes)


__all__ = [
    "MODEL_NAMES",
    "WSConv2D",
    "build_model",
    "nf_resnet50",
    "small_cnn",
    "wide_resnet",
]
