"""What TensorFlow's C++ runtime writes to stderr during a train step, its private values withheld.

A kernel that fails on the data (an out-of-range label read by a loss of
one's own, an id read by a custom layer's gather) logs its status to the
process's stderr before Python sees the error: "Local rendezvous is aborting
with status: INVALID_ARGUMENT: indices[3,0] = 4711 is not in [0, 10)", or a
sparse cross-entropy's "label value of 4711 ... Label values: 0 4711 2 ...",
every label of the micro-batch (found by a review). The Python exception is
scrubbed (`fit_entry.scrubbed_error`); this filter does the same for the log:
while a step runs, file descriptor 2 writes into a file of the filter's, and
after the step it is written to the real stderr as `scrub` returns it
(`fit_entry._scrubbed_log`: a log record of a failure keeps its prefix and
what is known to hold no value, the rest withheld). Setting
TF_CPP_MIN_LOG_LEVEL=2 before TensorFlow loads silences those lines
altogether (the training program does), but a user's `import keras` loads
TensorFlow first.
"""

import os
import sys
import tempfile
from typing import Callable


class StderrFilter:
    """A reusable context: fd 2 captured inside, replayed filtered on exit.

    Args:
      scrub: The captured text as it may be written to stderr.
    """

    def __init__(self, scrub: Callable[[str], str]):
        self._scrub = scrub
        self._capture = None
        self._saved = None

    def __enter__(self):
        if self._capture is None:
            self._capture = tempfile.TemporaryFile()
        sys.stderr.flush()
        self._saved = os.dup(2)
        os.dup2(self._capture.fileno(), 2)
        return self

    def __exit__(self, *exc_info):
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        capture = self._capture
        size = capture.seek(0, os.SEEK_END)
        if size:
            capture.seek(0)
            text = capture.read(size).decode("utf-8", errors="replace")
            capture.seek(0)
            capture.truncate()
            sys.stderr.write(self._scrub(text))
            sys.stderr.flush()
        return False
