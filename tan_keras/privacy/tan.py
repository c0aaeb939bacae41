"""The Total Amount of Noise (TAN) of Sander et al. (ICML 2023).

TAN summarizes how much noise a DP-SGD run injects, relative to signal:

    eta = q * sqrt(S) / (sqrt(2) * sigma)       (eta_step = q / (sqrt(2) sigma))

Runs with the same eta have (nearly) the same privacy when sigma >~ 2, given
by the closed form

    eps_TAN(eta, delta) = eta**2 + 2 * eta * sqrt(log(1 / delta)),

which comes from the per-step RDP of the subsampled Gaussian being about
alpha * eta_step**2 at large sigma. Below sigma ~ 2 the exact epsilon rises
far above eps_TAN: the run is "overcharged" (`overcharge.check_overcharge`).
eps_TAN is a planning tool; the accountant (`accounting.compute_epsilon`)
gives the number to report. This module is formulas only: the accountant
starts its calibration from them.
"""

import math

from tan_keras import _validate

# Below this noise multiplier the exact epsilon is markedly above eps_TAN
# (paper, Section 3; e.g. eta = 0.95, S = 1e4: eps 8.04 at sigma 2 vs 10.5 at
# sigma 1 and 34.4 at sigma 0.5, against eps_TAN ~ 7.4).
OVERCHARGE_SIGMA = 2.0

# Below this noise multiplier no meaningful epsilon exists at any TAN.
NO_PRIVACY_SIGMA = 0.5


def eta_step(noise_multiplier: float, sampling_rate: float) -> float:
    """TAN of a single step: q / (sqrt(2) * sigma).

    Args:
      noise_multiplier: sigma, a float >= 0 (0 gives math.inf).
      sampling_rate: Poisson sampling rate q, a float in (0, 1].

    Returns:
      The per-step TAN, a float > 0 (math.inf without noise).

    Raises:
      ValueError: if an argument is out of range.
    """
    sigma = _validate.non_negative("noise_multiplier", noise_multiplier)
    q = _validate.sampling_rate("sampling_rate", sampling_rate)
    if sigma == 0.0:
        return math.inf
    return q / (math.sqrt(2.0) * sigma)


def eta(noise_multiplier: float, sampling_rate: float, steps: int) -> float:
    """Total Amount of Noise of a run: q * sqrt(S) / (sqrt(2) * sigma).

    Args:
      noise_multiplier: sigma, a float >= 0 (0 gives math.inf when steps > 0).
      sampling_rate: Poisson sampling rate q, a float in (0, 1].
      steps: Number of noisy updates S, an integer >= 0 (0 gives 0.0).

    Returns:
      eta = sqrt(S) * eta_step, a float >= 0.

    Raises:
      ValueError: if an argument is out of range.
    """
    per_step = eta_step(noise_multiplier, sampling_rate)
    steps = _validate.integer("steps", steps, low=0)
    if steps == 0:
        return 0.0
    return math.sqrt(steps) * per_step


def eps_tan(eta: float, delta: float) -> float:
    """The TAN estimate of epsilon: eta**2 + 2 * eta * sqrt(log(1/delta)).

    Accurate (slightly pessimistic) when sigma >~ 2; an underestimate below.

    Args:
      eta: Total Amount of Noise, a float >= 0 (math.inf gives math.inf).
      delta: Target delta, a float in (0, 1).

    Returns:
      The estimate, a float >= 0.

    Raises:
      ValueError: if an argument is out of range.
    """
    delta = _validate.delta("delta", delta)
    if eta == math.inf:
        return math.inf
    eta = _validate.non_negative("eta", eta)
    return eta**2 + 2.0 * eta * math.sqrt(math.log(1.0 / delta))


def eta_for_epsilon(epsilon: float, delta: float) -> float:
    """Inverse of `eps_tan`: sqrt(log(1/delta) + eps) - sqrt(log(1/delta)).

    Args:
      epsilon: Privacy budget, a float >= 0.
      delta: Target delta, a float in (0, 1).

    Returns:
      The eta whose eps_TAN is `epsilon`.

    Raises:
      ValueError: if an argument is out of range.
    """
    epsilon = _validate.non_negative("epsilon", epsilon)
    log_inv_delta = math.log(1.0 / _validate.delta("delta", delta))
    return math.sqrt(log_inv_delta + epsilon) - math.sqrt(log_inv_delta)


def noise_multiplier_for_eta(eta: float, sampling_rate: float, steps: int) -> float:
    """Inverse of `eta` in sigma: q * sqrt(S) / (sqrt(2) * eta).

    Args:
      eta: Total Amount of Noise, a float > 0.
      sampling_rate: Poisson sampling rate q, a float in (0, 1].
      steps: Number of noisy updates S, an integer >= 1.

    Returns:
      The noise multiplier sigma whose run has this eta.

    Raises:
      ValueError: if an argument is out of range.
    """
    eta = _validate.positive("eta", eta)
    q = _validate.sampling_rate("sampling_rate", sampling_rate)
    steps = _validate.positive_int("steps", steps)
    return q * math.sqrt(steps) / (math.sqrt(2.0) * eta)
