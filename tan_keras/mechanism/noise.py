"""Gaussian noise for DP-SGD, from a key that nobody can regenerate.

The noise is what makes a DP-SGD run private: anyone who can regenerate it can
subtract it. So the noise key is drawn from the operating system's entropy
pool (`secrets`) by default; an explicit seed exists only for debugging and
says loudly that the run is then not private against anyone who knows it.

Streams: the noise of logical step t on replica r, variable i, is drawn with a
stateless Philox generator seeded by fold_in(fold_in(fold_in(key, t), r), i);
the noise of the step's clipped count (a released clipped fraction) folds in
a negative constant instead of i (`clipped_count_seed`).
So every (step, replica, variable) gets its own stream by construction: no
two replicas share noise, no step reuses another's, and a run resumed at step
t (the step count is checkpointed) continues exactly the noise of an
uninterrupted run. Stateless ops also compile with XLA on TPU.

Floating-point caveat (documented, not solved by any float-based DP-SGD
library): sampling a Gaussian in floating point leaks through the low-order
bits of the samples (Mironov 2012; Jin et al. 2022). tan_keras shares this
theoretical gap with TF Privacy, Opacus and JAX-Privacy.
"""

import secrets
import warnings
from typing import List, Optional

import tensorflow as tf

from tan_keras import _validate
from tan_keras.mechanism.not_private import SEEDED_NOISE_WARNING, NotPrivateWarning

_INT64_MIN = -(2**63)


def entropy_int64() -> int:
    """A 64-bit integer from OS entropy, as a signed int64 (for tf.Variable)."""
    return secrets.randbits(64) + _INT64_MIN


def make_noise_key(seed: Optional[int] = None) -> List[int]:
    """Creates the secret key of the DP noise.

    Args:
      seed: None (default) draws the 128-bit key from OS entropy. An integer
        gives a reproducible key and warns (`NotPrivateWarning`) that the run
        is not private against anyone who knows it.

    Returns:
      Two int64 words, the key of a stateless Philox generator.

    Raises:
      ValueError: if `seed` is not an integer >= 0.
    """
    if seed is None:
        return [entropy_int64() for _ in range(2)]
    seed = _validate.integer("noise_seed", seed, low=0, high=2**63 - 1)
    warnings.warn(SEEDED_NOISE_WARNING.format(seed=seed), NotPrivateWarning, stacklevel=2)
    return [seed, 0x7A4E]


def step_seed(key: tf.Tensor, step: tf.Tensor, replica_id=0) -> tf.Tensor:
    """The seed of one logical step's noise on one replica.

    Args:
      key: [2] int64 noise key (see `make_noise_key`).
      step: Scalar index of the logical step (noisy updates applied before it).
      replica_id: Index of the replica in its sync group.

    Returns:
      A [2] stateless-RNG seed, distinct for every (key, step, replica).
    """
    seed = tf.random.experimental.stateless_fold_in(key, tf.cast(step, tf.int64))
    return tf.random.experimental.stateless_fold_in(seed, tf.cast(replica_id, tf.int64))


# Folded into a step's seed for the noise of the clipped count (DPConfig.
# clipped_fraction_std). The gradient's streams fold in the variable index,
# >= 0; a negative constant can never be one of them.
_CLIPPED_COUNT_STREAM = -0x434C4950  # "CLIP"


def clipped_count_seed(key: tf.Tensor, step: tf.Tensor, replica_id=0) -> tf.Tensor:
    """The seed of one logical step's noise on its clipped count, on one replica.

    A stream of the same secret key as the gradient noise, independent of
    it: fold_in(step_seed(key, step, replica), a negative constant), where
    the gradient's variables fold in their index (>= 0).

    Args:
      key: [2] int64 noise key (see `make_noise_key`).
      step: Scalar index of the logical step.
      replica_id: Index of the replica in its sync group.

    Returns:
      A [2] stateless-RNG seed for `add_gaussian_noise`.
    """
    return tf.random.experimental.stateless_fold_in(
        step_seed(key, step, replica_id), tf.constant(_CLIPPED_COUNT_STREAM, tf.int64)
    )


def add_gaussian_noise(
    grad_sum: List[tf.Tensor],
    stddev: float,
    seed: tf.Tensor,
) -> List[tf.Tensor]:
    """Adds N(0, stddev^2 I) to a summed gradient.

    This is the one place the package adds DP noise. `stddev` is the std on the
    SUM of clipped gradients (sigma * C, or sigma * C / sqrt(R) for each of R
    replicas whose sums are then added), never on the mean.

    Args:
      grad_sum: One tensor per variable.
      stddev: Noise std; 0 returns the sum unchanged (and draws nothing).
      seed: [2] seed from `step_seed`.

    Returns:
      The noisy sum, one tensor per variable.
    """
    if stddev == 0:
        return list(grad_sum)
    return [
        g
        + tf.random.stateless_normal(
            tf.shape(g),
            seed=tf.random.experimental.stateless_fold_in(seed, index),
            stddev=stddev,
            dtype=g.dtype,
        )
        for index, g in enumerate(grad_sum)
    ]
