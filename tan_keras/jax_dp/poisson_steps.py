"""Poisson-sampled logical steps over the training examples, without TensorFlow.

Each logical step includes every training row independently with probability
q = B / N, drawn from a generator seeded with 128 bits of OS entropy (never a
fixed default), and is padded to a fixed number of rows so that one compiled
step serves (almost) every draw: a draw larger than the padded size gets the
next multiple of `row_multiple` rows, which compiles once more and changes
nothing else. Each step also carries its own noise key, 64 bits of OS
entropy, so the secret of the noise never lives in the model's variables and
cannot reach `get_weights`, a `.keras` file or a checkpoint.
"""

import math
import secrets
from typing import Any, Callable, Iterator, Optional, Tuple

import numpy as np

from tan_keras.jax_dp.example_source import Rows


def padded_rows(expected_batch_size: int, sampling_rate: float, row_multiple: int) -> int:
    """The padded size of a step: B plus 4 standard deviations, a multiple of `row_multiple`.

    A Poisson step exceeds B + 4 std with probability about 3e-5; such a step
    is padded to the next multiple instead (one more compilation, the first
    time that size occurs).

    Args:
      expected_batch_size: B.
      sampling_rate: q.
      row_multiple: The padded size is a multiple of it (chunk size times devices).

    Returns:
      The number of rows of a padded step.
    """
    std = math.sqrt(expected_batch_size * (1.0 - sampling_rate))
    rows = expected_batch_size + 4.0 * std
    return int(math.ceil(rows / row_multiple) * row_multiple)


def poisson_steps(
    rows_of: Rows,
    num_rows: int,
    sampling_rate: float,
    expected_batch_size: int,
    row_multiple: int,
    may_draw: Optional[Callable[[int], bool]] = None,
    first_step: int = 0,
) -> Iterator[Tuple[Any, Any, dict]]:
    """A sequence of padded Poisson steps over the rows of `x` and `y` (endless by default).

    Args:
      rows_of: `rows_of(indices, count)` -> (x_step, y_step): the examples
        at `indices` stacked, then zero rows up to `count`
        (`example_source.array_rows` or `source_rows`).
      num_rows: N, the number of training examples.
      sampling_rate: q, each row's probability of being in a step.
      expected_batch_size: B (for the padded size).
      row_multiple: The padded size is a multiple of it.
      may_draw: Optional; called with the number of steps drawn so far
        before each step: the sequence ends at the first False (a cap on the
        updates, checked before a step exists, so no step beyond it can be
        trained, however far ahead the consumer reads).
      first_step: The number of the first step: the updates the weights
        went through before it (the EMA's warm-up reads it).

    Yields:
      (x_step, y_step, {"keep": bool[rows], "noise_key": uint32[rows, 2],
      "step": int32[rows]}): the drawn rows first, then zero padding; `keep`
      is True on drawn rows; every row of `noise_key` holds the step's key,
      and of `step` its number (one per row, so that they are split over
      devices like the rows and every device holds them).
    """
    rng = np.random.Generator(np.random.PCG64(secrets.randbits(128)))
    usual_rows = padded_rows(expected_batch_size, sampling_rate, row_multiple)
    drawn = 0
    while may_draw is None or may_draw(drawn):
        number = first_step + drawn
        drawn += 1
        indices = np.flatnonzero(rng.random(num_rows) < sampling_rate)
        rows = max(usual_rows, int(math.ceil(len(indices) / row_multiple) * row_multiple))
        keep = np.zeros(rows, dtype=bool)
        keep[: len(indices)] = True
        key = np.frombuffer(secrets.token_bytes(8), dtype=np.uint32)
        x_step, y_step = rows_of(indices, rows)
        yield (
            x_step,
            y_step,
            {
                "keep": keep,
                "noise_key": np.tile(key, (rows, 1)),
                "step": np.full(rows, number, np.int32),
            },
        )
