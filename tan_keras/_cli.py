"""What the package's command lines share: one-line errors, exit status 2.

Every refusal (a bad flag, a bad combination, an unavailable dataset) prints
one line, "error: <message>", on stderr and exits with status 2, before any
work is done.
"""

import sys

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
        fail(str(err))
