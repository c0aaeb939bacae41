"""A private mean and variance of bounded features: the Gaussian mechanism on clipped moments.

The statistics a `keras.layers.Normalization` holds (per feature, a mean and
a variance) computed from private data, with a guarantee:

1. Each value is clipped to public bounds [lower, upper] (a NaN counts as
   `lower`) and rescaled to u = (x - lower) / (upper - lower) in [0, 1].
2. Each example contributes, for each of the d features, the mean of u and
   of u^2 over its own positions (the axes the layer reduces, other than the
   batch axis): a vector in [0, 1]^(2d), of L2 norm at most sqrt(2d).
3. The two [d] sums over the examples get Gaussian noise of std
   sigma * sqrt(2d) on every coordinate.
4. Divided by N, the number of examples (treated as public), and mapped
   back: mean = lower + (upper - lower) mean_u, variance = (upper - lower)^2
   max(E[u^2] - mean_u^2, 0).

Privacy. Adding or removing one example moves the pair of sums by at most
sqrt(2d) in L2 norm (step 2), so step 3 is the Gaussian mechanism with noise
multiplier sigma: a `dp_accounting.GaussianDpEvent(sigma)` under add/remove
adjacency (`releases.Mechanism("gaussian", sigma)`). Step 4 is
post-processing given N. N is released, as DP-SGD's `dataset_size` is; a
run whose N must stay secret needs a noisy count as well.

The noise comes from OS entropy (`noise_generator()`); a seed is for
debugging and makes the release not private against anyone who knows it.
Plain numpy: the caller streams the data, batch by batch.
"""

import math
import secrets
import warnings
from typing import NamedTuple, Optional, Sequence

import numpy as np

from tan_keras import _validate
from tan_keras.mechanism.not_private import SEEDED_NOISE_WARNING, NotPrivateWarning


class ClippedMoments(NamedTuple):
    """Sums over examples of their clipped, rescaled per-feature moments (step 2).

    Attributes:
      sum_u: [*features] sum over examples of each example's mean of u.
      sum_u2: [*features] the same for u^2.
      count: The number of examples summed.
    """

    sum_u: np.ndarray
    sum_u2: np.ndarray
    count: int

    def __add__(self, other: "ClippedMoments") -> "ClippedMoments":
        return ClippedMoments(
            self.sum_u + other.sum_u, self.sum_u2 + other.sum_u2, self.count + other.count
        )


class PrivateStatistics(NamedTuple):
    """A released mean and variance.

    Attributes:
      mean: [*features] the private mean.
      variance: [*features] the private variance (>= 0).
      mean_noise_std: [*features] the std of the noise on `mean`:
        (upper - lower) * sigma * sqrt(2d) / N.
      count: N, the number of examples (public).
      noise_multiplier: sigma.
    """

    mean: np.ndarray
    variance: np.ndarray
    mean_noise_std: np.ndarray
    count: int
    noise_multiplier: float


def clipped_moments(
    batch: np.ndarray, lower: np.ndarray, upper: np.ndarray, example_axes: Sequence[int]
) -> ClippedMoments:
    """Steps 1 and 2 for one batch of examples (axis 0).

    Args:
      batch: [n, ...] values.
      lower: Lower bounds, broadcastable against `batch` (size 1 on the
        batch axis and on `example_axes`).
      upper: Upper bounds, alike, > lower.
      example_axes: The axes (> 0) each example's moments average over.

    Returns:
      The `ClippedMoments` of the batch, in float64.
    """
    x = np.asarray(batch, np.float64)
    lower = np.asarray(lower, np.float64)
    upper = np.asarray(upper, np.float64)
    clipped = np.clip(np.where(np.isnan(x), lower, x), lower, upper)
    u = (clipped - lower) / (upper - lower)
    axes = tuple(example_axes)
    # Within [0, 1] despite rounding: the sensitivity bound needs it.
    mean_u = np.clip(u.mean(axis=axes) if axes else u, 0.0, 1.0)
    mean_u2 = np.clip(np.square(u).mean(axis=axes) if axes else np.square(u), 0.0, 1.0)
    return ClippedMoments(mean_u.sum(axis=0), mean_u2.sum(axis=0), int(x.shape[0]))


def noise_generator(seed: Optional[int] = None) -> np.random.Generator:
    """The generator of a release's noise.

    Args:
      seed: None (default): a 128-bit key from OS entropy. An integer makes
        the noise reproducible and the release NOT private against anyone
        who knows it (a `NotPrivateWarning` says so).

    Returns:
      A numpy Generator (Philox).

    Raises:
      ValueError: if `seed` is not None or an integer >= 0.
    """
    if seed is None:
        return np.random.Generator(np.random.Philox(secrets.randbits(128)))
    seed = _validate.integer("noise_seed", seed, low=0)
    warnings.warn(SEEDED_NOISE_WARNING.format(seed=seed), NotPrivateWarning, stacklevel=2)
    return np.random.Generator(np.random.Philox(seed))


def release(
    moments: ClippedMoments,
    lower: np.ndarray,
    upper: np.ndarray,
    noise_multiplier: float,
    rng: np.random.Generator,
) -> PrivateStatistics:
    """Steps 3 and 4: noises the sums once and maps them back to statistics.

    Args:
      moments: The sums over all examples (`clipped_moments`, added up).
      lower: [*features] lower bounds (broadcastable to the sums' shape).
      upper: [*features] upper bounds, > lower.
      noise_multiplier: sigma > 0.
      rng: The noise's generator (`noise_generator`).

    Returns:
      The `PrivateStatistics`.

    Raises:
      ValueError: if sigma is not > 0 or no example was summed.
    """
    sigma = _validate.positive("noise_multiplier", noise_multiplier)
    count = _validate.positive_int(
        "data", moments.count, hint="The data must hold at least one example"
    )
    sum_u = np.asarray(moments.sum_u, np.float64)
    sum_u2 = np.asarray(moments.sum_u2, np.float64)
    features = max(sum_u.size, 1)
    std = sigma * math.sqrt(2 * features)
    mean_u = (sum_u + rng.normal(0.0, std, sum_u.shape)) / count
    mean_u2 = (sum_u2 + rng.normal(0.0, std, sum_u2.shape)) / count
    width = np.broadcast_to(np.asarray(upper, np.float64) - lower, sum_u.shape)
    mean = np.asarray(lower, np.float64) + width * mean_u
    variance = np.square(width) * np.maximum(mean_u2 - np.square(mean_u), 0.0)
    return PrivateStatistics(mean, variance, width * std / count, count, sigma)
