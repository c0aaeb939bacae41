"""Pieces shared by the model builders: argument checks and initializers."""

from typing import Sequence, Tuple

import keras

from tan_keras import _validate


def check_input_shape(input_shape: Sequence[int]) -> Tuple[int, int, int]:
    """Checks an image shape (height, width, channels) of positive integers.

    Args:
      input_shape: Shape of one image, channels last, without the batch axis.

    Returns:
      The shape as a tuple of three Python ints.

    Raises:
      ValueError: if `input_shape` is not three positive integers.
    """
    expected = "a (height, width, channels) tuple of positive integers"
    try:
        dims = tuple(input_shape)
    except TypeError:
        raise _validate.invalid("input_shape", expected, input_shape) from None
    if len(dims) != 3:
        raise _validate.invalid("input_shape", expected, input_shape)
    try:
        return tuple(_validate.positive_int("input_shape", d) for d in dims)
    except ValueError:
        raise _validate.invalid("input_shape", expected, input_shape) from None


def fan_in_truncated_normal() -> keras.initializers.Initializer:
    """Truncated normal whose *actual* standard deviation is 1/sqrt(fan_in).

    `keras.initializers.TruncatedNormal(stddev=s)` cuts at 2s and so ends up
    with a standard deviation of about 0.88 s; `VarianceScaling` corrects for
    the truncation, which is what "std 1/sqrt(fan_in)" in the TAN (and De et
    al. 2022) WideResNet recipe asks for.

    Returns:
      A fresh initializer (one per layer, so layers don't share values).
    """
    return keras.initializers.VarianceScaling(
        scale=1.0, mode="fan_in", distribution="truncated_normal"
    )
