"""The models the training program builds by name; no TensorFlow.

The names are checked when the program's flags are, before TensorFlow loads
(`tan_keras.models.build_model` builds them).
"""

import re
from typing import Any, Optional, Tuple

from tan_keras import _validate

MODEL_NAMES = ("small_cnn", "wrn16_4", "nf_resnet50")

# "wrn16_4", "wrn28_10", ...: any WideResNet depth and width.
_WRN_NAME = re.compile(r"wrn(\d+)_(\d+)")


def wrn_depth_width(name: Any) -> Optional[Tuple[int, int]]:
    """(depth, width) of a "wrn<depth>_<width>" name, else None."""
    match = _WRN_NAME.fullmatch(name) if isinstance(name, str) else None
    return (int(match.group(1)), int(match.group(2))) if match else None


def check_model_name(name: Any) -> str:
    """Checks a model name.

    Args:
      name: One of `MODEL_NAMES` or "wrn<depth>_<width>".

    Returns:
      `name`.

    Raises:
      ValueError: naming `model`, for any other value.
    """
    if not (isinstance(name, str) and (name in MODEL_NAMES or wrn_depth_width(name))):
        raise _validate.invalid(
            "model", "one of " + ", ".join(MODEL_NAMES) + " or wrn<depth>_<width>", name
        )
    return name
