"""One validation vocabulary for the whole package.

Every check raises `ValueError` with the same shape of message, modelled on
Keras: "Invalid value for `name`: expected <range>. Received: name=<value>".
Checks run before any work is done, so a bad argument never leaves a partial
result (a checkpoint, a metrics file) behind.
"""

import math
import numbers
from typing import Any, Iterable, Optional, Union


def invalid(name: str, expected: str, value: Any, hint: str = "") -> ValueError:
    """Builds the package's standard error for a bad argument.

    Args:
      name: Name of the argument (or flag) as the user wrote it.
      expected: Human description of the allowed range, e.g. "a float > 0".
      value: The value received.
      hint: Optional sentence on what would break or how to fix it.

    Returns:
      A `ValueError` to raise.
    """
    message = f"Invalid value for `{name}`: expected {expected}. Received: {name}={value!r}"
    if hint:
        message += f". {hint}"
    return ValueError(message)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def real(
    name: str,
    value: Any,
    *,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    hint: str = "",
) -> float:
    """Checks that `value` is a finite real number in a range.

    Args:
      name: Argument name used in the error message.
      value: Value to check.
      low: Lower bound, or None for no bound.
      high: Upper bound, or None for no bound.
      low_inclusive: Whether `low` itself is allowed.
      high_inclusive: Whether `high` itself is allowed.
      hint: Optional extra sentence for the error message.

    Returns:
      `value` as a Python float.

    Raises:
      ValueError: if `value` is not a finite real number inside the range.
    """
    expected = _describe_range("a finite float", low, high, low_inclusive, high_inclusive)
    if not _is_real(value) or not math.isfinite(float(value)):
        raise invalid(name, expected, value, hint)
    value = float(value)
    if low is not None and (value < low or (value == low and not low_inclusive)):
        raise invalid(name, expected, value, hint)
    if high is not None and (value > high or (value == high and not high_inclusive)):
        raise invalid(name, expected, value, hint)
    return value


def integer(
    name: str,
    value: Any,
    *,
    low: Optional[int] = None,
    high: Optional[int] = None,
    hint: str = "",
) -> int:
    """Checks that `value` is an integer in [low, high].

    Floats with an integral value (e.g. 2500.0) are accepted; 2500.5 is not.

    Args:
      name: Argument name used in the error message.
      value: Value to check.
      low: Smallest allowed value, or None.
      high: Largest allowed value, or None.
      hint: Optional extra sentence for the error message.

    Returns:
      `value` as a Python int.

    Raises:
      ValueError: if `value` is not an integer inside the range.
    """
    expected = _describe_range("an integer", low, high, True, True)
    if isinstance(value, bool):
        raise invalid(name, expected, value, hint)
    if isinstance(value, numbers.Integral):
        as_int = int(value)
    elif _is_real(value) and math.isfinite(float(value)) and float(value).is_integer():
        as_int = int(value)
    else:
        raise invalid(name, expected, value, hint)
    if (low is not None and as_int < low) or (high is not None and as_int > high):
        raise invalid(name, expected, value, hint)
    return as_int


def positive_int(name: str, value: Any, hint: str = "") -> int:
    """Checks that `value` is an integer >= 1. See `integer`."""
    return integer(name, value, low=1, hint=hint)


def positive(name: str, value: Any, hint: str = "") -> float:
    """Checks that `value` is a finite float > 0. See `real`."""
    return real(name, value, low=0.0, low_inclusive=False, hint=hint)


def non_negative(name: str, value: Any, hint: str = "") -> float:
    """Checks that `value` is a finite float >= 0. See `real`."""
    return real(name, value, low=0.0, hint=hint)


def delta(name: str, value: Any) -> float:
    """Checks a DP delta: a float in the open interval (0, 1)."""
    return real(name, value, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)


def sampling_rate(name: str, value: Any) -> float:
    """Checks a Poisson sampling rate q: a float in (0, 1]."""
    return real(name, value, low=0.0, high=1.0, low_inclusive=False)


def one_of(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Checks that `value` is one of `choices`.

    Args:
      name: Argument name used in the error message.
      value: Value to check.
      choices: Allowed values.

    Returns:
      `value`, unchanged.

    Raises:
      ValueError: if `value` is not in `choices`.
    """
    choices = list(choices)
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise invalid(name, f"one of {listed}", value)
    return value


def _describe_range(
    kind: str,
    low: Optional[float],
    high: Optional[float],
    low_inclusive: bool,
    high_inclusive: bool,
) -> str:
    if low is not None and high is not None:
        left = "[" if low_inclusive else "("
        right = "]" if high_inclusive else ")"
        return f"{kind} in {left}{_fmt(low)}, {_fmt(high)}{right}"
    if low is not None:
        return f"{kind} {'>=' if low_inclusive else '>'} {_fmt(low)}"
    if high is not None:
        return f"{kind} {'<=' if high_inclusive else '<'} {_fmt(high)}"
    return kind


def _fmt(bound: float) -> str:
    return repr(int(bound)) if float(bound).is_integer() else repr(bound)


def examples_per_chunk(value: Any) -> Union[int, str, None]:
    """Checks `examples_per_chunk` (tan_keras.mechanism.chunking), here so that CLIs need no TF.

    Args:
      value: "auto", None (the whole micro-batch at once) or an int >= 1.

    Returns:
      The value, an int normalized from integral types.

    Raises:
      ValueError: for anything else.
    """
    if value is None or (isinstance(value, str) and value == "auto"):
        return value
    if isinstance(value, str):
        raise ValueError(
            "Invalid value for `examples_per_chunk`: expected 'auto', None or an integer "
            f">= 1. Received: examples_per_chunk={value!r}"
        )
    return positive_int(
        "examples_per_chunk", value, hint="Or 'auto', or None for the whole micro-batch at once."
    )
