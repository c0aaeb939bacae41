"""What the package's command lines share: one-line errors, exit status 2.

Every refusal (a bad flag, a bad combination, an unavailable dataset) prints
one line, "error: <message>", on stderr and exits with status 2, before any
work is done.
"""

import sys
from typing import Any, Callable, Mapping, Optional

from absl import flags


def fail(message: str):
    """Prints `message` as one `error:` line on stderr and exits with status 2."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr, flush=True)
    sys.exit(2)


def parse_flags(argv):
    """absl flags parser for `app.run(..., flags_parser=parse_flags)`.

    Resets the flags first, so that a second in-process run (tests) starts
    from the defaults. absl's own parse errors (unknown flag, --json=maybe)
    span two lines and exit 1; they get the one-line, status-2 contract too.

    Args:
      argv: The full argument list.

    Returns:
      The remaining positional arguments.
    """
    flags.FLAGS.unparse_flags()
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        fail(flag_error_message(err))


def flag_error_message(err: Exception) -> str:
    """absl's error for a flag, as one line.

    A typed flag's value is refused by the package's own check, whose message
    already names the flag, its range and the value: absl's "flag --x=v: "
    prefix is dropped from it.

    Args:
      err: An `absl.flags.Error`.

    Returns:
      The message.
    """
    message = " ".join(str(err).split())
    head, sep, tail = message.partition(": ")
    if sep and head.startswith("flag --") and tail.startswith("Invalid value for `"):
        return tail
    return message


def parse_number(text: Optional[str]) -> Any:
    """A flag's text as an int or float; anything else is returned unchanged.

    Non-numbers are passed through so that the validators, which know each
    flag's range, reject them with the package's standard message.

    Args:
      text: The flag's value as typed, or None when the flag was not given.

    Returns:
      int, float, None, or `text` itself when it is not a number.
    """
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


class CheckedParser(flags.ArgumentParser):
    """absl parser: flag text -> a typed value checked by the package's rule.

    Numbers are read with `parse_number` and handed to `check`, so "abc" or
    2.5 for an integer gets the check's message (flag, range, value), not
    absl's.

    Args:
      kind: The value's type: int, float or str.
      check: value -> checked value, raising ValueError; None: no check.
      words: Texts that stand for a non-number setting, e.g. {"none": None}.
    """

    def __init__(
        self,
        kind: type,
        check: Optional[Callable[[Any], Any]] = None,
        words: Optional[Mapping[str, Any]] = None,
    ):
        super().__init__()
        self._kind, self._check, self._words = kind, check, dict(words or {})

    def parse(self, argument):
        value = argument
        if isinstance(argument, str):
            word = argument.strip().lower()
            if word in self._words:
                return self._words[word]
            if self._kind in (int, float):
                value = parse_number(argument)
        return value if self._check is None else self._check(value)

    def flag_type(self):
        return self._kind.__name__


def define_checked(
    name: str,
    default: Any,
    help_text: str,
    kind: type,
    check: Optional[Callable[[Any], Any]] = None,
    words: Optional[Mapping[str, Any]] = None,
    flag_values: flags.FlagValues = flags.FLAGS,
):
    """Defines a typed flag whose value `check` validates when parsed.

    Args:
      name: Flag name.
      default: Default value (checked too), or None for "not given".
      help_text: Help line.
      kind: int, float or str.
      check: value -> checked value, raising ValueError; None: no check.
      words: Texts that stand for a non-number setting.
      flag_values: Where to define it.

    Returns:
      The absl FlagHolder.
    """
    return flags.DEFINE(
        CheckedParser(kind, check, words),
        name,
        default,
        help_text,
        flag_values=flag_values,
        serializer=flags.ArgumentSerializer(),
    )
