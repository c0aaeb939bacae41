"""The training rows of a JAX `fit`, registered with `data_copies`.

`data_copies` recognises copies of training rows and statistics of them
only among the arrays registered with it (`register_rows`). The JAX `fit`
registers its training inputs before anything looks for copies of them
(`traced_loss.py`, the `provenance` checks, `mechanism/held_out.py`), as the
TensorFlow route does.
"""

from typing import Any

import numpy as np

from tan_keras.mechanism import data_copies


def register(x: Any, from_source: bool) -> None:
    """Registers the training inputs of a fit with `data_copies`.

    Args:
      x: The training inputs: arrays (or a dict or list of them), or a
        random-access source (`example_source.py`).
      from_source: Whether `x` is a source: the arrays it holds with one row
        per example (its images, say) are registered, as far as they are
        reachable as its attributes; what it computes per example is not.
    """
    if not from_source:
        data_copies.register_rows(x)
        return
    rows = len(x)
    held = [
        value
        for value in getattr(x, "__dict__", {}).values()
        if isinstance(value, np.ndarray) and value.ndim >= 2 and len(value) == rows
    ]
    if held:
        data_copies.register_rows(held)
