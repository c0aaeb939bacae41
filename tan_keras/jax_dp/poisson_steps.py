"""Poisson-sampled logical steps over the training examples, without TensorFlow.

Each logical step includes every training row independently with probability
q = B / N, drawn from a generator seeded with a 128-bit secret from OS entropy
(never a fixed default; `hosts.shared_secret`), and is padded to a fixed
number of rows so that one compiled step serves (almost) every draw: a draw
larger than the padded size gets the next multiple of `row_multiple` rows,
which compiles once more and changes nothing else. Each step also carries its
own noise key, derived from the secret and the step's draw number by a keyed
BLAKE2b hash, so the secret of the noise never lives in the model's variables
and cannot reach `get_weights`, a `.keras` file or a checkpoint.

With several processes (`hosts.py`), all draw the same steps and the same
keys from the shared secret, and each yields only its share of a step's rows:
process p holds the drawn examples p, p + P, p + 2P, ... (so the examples are
loaded evenly across hosts), then zero padding; the global step is the
processes' shares together.
"""

import hashlib
import math
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
    secret: Optional[int] = None,
    process: Tuple[int, int] = (0, 1),
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
      secret: The 128-bit secret the steps and their noise keys derive
        from; None draws one from OS entropy (one process only: several
        must share theirs, `hosts.shared_secret`).
      process: (p, P): this process's index and the number of processes;
        `row_multiple` counts the devices of all of them.

    Yields:
      (x_step, y_step, {"keep": bool[rows], "noise_key": uint32[rows, 2],
      "step": int32[rows]}): this process's share (rows / P of the step's
      rows): its drawn rows first, then zero padding; `keep` is True on
      drawn rows; every row of `noise_key` holds the step's key, and of
      `step` its number (one per row, so that they are split over devices
      like the rows and every device holds them).

    Raises:
      ValueError: for several processes without a shared secret, or a
        process index out of range.
    """
    index, processes = process
    if not 0 <= index < processes or row_multiple % processes:
        raise ValueError(
            f"Invalid value for `process`: expected 0 <= p < P, with P dividing row_multiple "
            f"({row_multiple}). Received: {process}."
        )
    if secret is None:
        if processes > 1:
            raise ValueError("Several processes must draw their steps from one shared secret.")
        from tan_keras.jax_dp import hosts

        secret = hosts.shared_secret()
    secret_bytes = int(secret).to_bytes(16, "little")
    rng = np.random.Generator(np.random.PCG64(int(secret)))
    usual_rows = padded_rows(expected_batch_size, sampling_rate, row_multiple)
    drawn = 0
    while may_draw is None or may_draw(drawn):
        number = first_step + drawn
        key = _noise_key(secret_bytes, drawn)
        drawn += 1
        indices = np.flatnonzero(rng.random(num_rows) < sampling_rate)
        rows = max(usual_rows, int(math.ceil(len(indices) / row_multiple) * row_multiple))
        share = rows // processes
        mine = indices[index::processes]
        keep = np.zeros(share, dtype=bool)
        keep[: len(mine)] = True
        x_step, y_step = rows_of(mine, share)
        yield (
            x_step,
            y_step,
            {
                "keep": keep,
                "noise_key": np.tile(key, (share, 1)),
                "step": np.full(share, number, np.int32),
            },
        )


def _noise_key(secret_bytes: bytes, draw: int) -> np.ndarray:
    """uint32[2]: the noise key of the `draw`-th step, a keyed hash of the secret.

    A keyed BLAKE2b is a pseudo-random function: the keys of different
    steps are independent-looking, and none reveals the secret or another.
    """
    digest = hashlib.blake2b(
        draw.to_bytes(8, "little"), digest_size=8, key=secret_bytes, person=b"tan-noise"
    ).digest()
    return np.frombuffer(digest, dtype=np.uint32).copy()
