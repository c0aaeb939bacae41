"""Gaussian noise for DP-SGD, from an RNG that nobody can regenerate.

The noise is what makes a DP-SGD run private: anyone who can regenerate it can
subtract it. So the RNG is seeded from the operating system's entropy pool
(`secrets`) by default; an explicit seed exists only for debugging and says
loudly that the run is then not private against anyone who knows the seed.

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

_INT64_MIN = -(2**63)

SEEDED_NOISE_WARNING = (
    "The DP noise RNG was given an explicit seed ({seed}). The run is NOT private "
    "against anyone who knows this seed: they can regenerate the noise and "
    "subtract it. Use an explicit seed for debugging only."
)


class NotPrivateWarning(UserWarning):
    """Warned when a setting voids the privacy guarantee against some observer."""


def make_noise_generator(seed: Optional[int] = None) -> tf.random.Generator:
    """Creates the RNG that draws DP noise.

    Args:
      seed: None (default) seeds the full Philox state (counter and key) from
        OS entropy. An integer gives a reproducible stream and warns that the
        run is not private against anyone who knows it.

    Returns:
      A `tf.random.Generator` (Philox). It is a trackable object: saving it in
      a checkpoint saves its state, so a resumed run continues the stream
      instead of replaying noise.

    Raises:
      ValueError: if `seed` is not an integer >= 0.
    """
    if seed is None:
        # Philox state is three 64-bit words: a 128-bit counter and a 64-bit key.
        state = [secrets.randbits(64) + _INT64_MIN for _ in range(3)]
        return tf.random.Generator.from_state(state, alg="philox")
    seed = _validate.integer("noise_seed", seed, low=0)
    warnings.warn(SEEDED_NOISE_WARNING.format(seed=seed), NotPrivateWarning, stacklevel=2)
    return tf.random.Generator.from_seed(seed, alg="philox")


def add_gaussian_noise(
    grad_sum: List[tf.Tensor],
    stddev: float,
    generator: tf.random.Generator,
) -> List[tf.Tensor]:
    """Adds N(0, stddev^2 I) to a summed gradient.

    This is the one place the package adds DP noise. `stddev` is the std on the
    SUM of clipped gradients (sigma * C), never on the mean.

    Args:
      grad_sum: One tensor per variable.
      stddev: sigma * C; 0 returns the sum unchanged (and draws nothing).
      generator: The noise RNG (see `make_noise_generator`).

    Returns:
      The noisy sum, one tensor per variable.
    """
    if stddev == 0:
        return list(grad_sum)
    return [g + generator.normal(tf.shape(g), stddev=stddev, dtype=g.dtype) for g in grad_sum]
