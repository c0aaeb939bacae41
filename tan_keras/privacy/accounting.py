"""Privacy accounting for DP-SGD with Poisson sampling (dp_accounting inside).

One noisy update of DP-SGD is a sampled Gaussian mechanism: each of the N
training examples joins the batch independently with probability q = B/N, and
Gaussian noise of std `noise_multiplier` * C is added to the sum of clipped
gradients. A run of S updates is that event composed S times:

    SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), S)

This module builds that event (`dp_event_for`), turns it into an epsilon at a
given delta with dp_accounting's RDP or PLD accountant (`compute_epsilon`),
and solves for one unknown given a target epsilon: the noise multiplier, the
number of steps or the batch size. Every solver returns a value whose epsilon
is at most the target (never an overshoot) and re-checks that before
returning.

The event names the sampler: these numbers are valid only if batches really
are Poisson samples. Shuffled fixed-size batches need a different (weaker)
analysis: `shuffled_dp_event` / `compute_shuffled_epsilon`, without
amplification.

Two accountants:
  * "rdp": Renyi DP with the Balle et al. (2020) conversion, the number the
    TAN paper reports. Fast: 20-200 ms per (sigma, q), whatever S is, and
    cached, so other step counts cost ~0.1 ms.
  * "pld": privacy loss distributions. Tighter (measured 6-7% below RDP at
    the paper's settings: 6.58 vs 7.10 for the CIFAR-10 recipe), slower (0.03
    to 0.5 s there), and its cost grows with epsilon, so it is used only
    where epsilon is meaningful (see `PLD_MAX_EPSILON`).
"""

import dataclasses
import functools
import logging
import math
from typing import Callable, Optional

import numpy as np
from dp_accounting import dp_event, pld, rdp
from dp_accounting.rdp import rdp_privacy_accountant

from tan_keras import _validate
from tan_keras.privacy import tan

# dp-accounting >= 0.4.4 logs one warning per RDP order it leaves out when its
# series for a fractional order below 2 does not converge (large sampling
# rates, small noise), for every epsilon it computes: hundreds of lines during
# a calibration. Leaving an order out can only raise the reported epsilon
# (the minimum is over fewer orders), so the bound stays valid and there is
# nothing for the user to do: the lines are dropped.
_NOT_CONVERGED = "_compute_log_a_frac failed to converge"


def _not_an_order_left_out(record: logging.LogRecord) -> bool:
    return _NOT_CONVERGED not in str(record.msg)


logging.getLogger("absl").addFilter(_not_an_order_left_out)

ACCOUNTANTS = ("rdp", "pld")

# Above this epsilon (by the cheap RDP bound) the PLD is not computed and the
# RDP value, itself a valid upper bound, is returned instead: a PLD's support
# grows with epsilon / discretization interval, and measured costs explode
# (sigma = 0.0195, S = 18000: 34 s and 3 GB at interval 1e-3; an earlier try at
# 1e-2 was killed for memory), while an epsilon this large means no
# meaningful privacy whatever its exact value. Below the cap, PLD <= RDP (up
# to the PLD's ~1e-3 relative discretization error, see below).
PLD_MAX_EPSILON = 100.0

# Likewise above this many steps: dp_accounting's self-composition grows
# faster than linearly in S at a fine interval (q = 1e-3, sigma = 10: 0.5 s at
# S = 2.6e5, 4.4 s at 1e6, 81 s at 8.4e6), while the paper's longest run has
# 72,000 steps. Solvers that probe huge step counts stay fast.
PLD_MAX_STEPS = 10**6

# The PLD's pessimistic discretization over-estimates epsilon by a relative
# error of about 0.085 * (interval / (q / sigma))**2, where q / sigma is the
# scale of one step's privacy loss (measured on 50 configurations, q in
# [1e-4, 1], sigma in [0.5, 30], S up to 1e6). A fixed interval fails both
# ways: 1e-3 is +0.39 at S = 1e6, q = 1e-3, sigma = 1 and doubles a small
# epsilon (0.04 -> 0.087 at q/sigma = 1.3e-4), while 1e-4 everywhere is slow.
# An interval of 0.1 * q / sigma keeps the error near 1e-3 relative (CIFAR-10
# recipe: 6.5797 vs 6.5789 converged) at 0.03-0.5 s for the paper's runs and
# under 2 s in the worst measured case; capped at 1e-3, where the error is
# already smaller.
_PLD_INTERVAL_PER_LOSS_SCALE = 0.1
_PLD_INTERVAL_MAX = 1e-3

# Search limits for the calibration routines. Beyond them the answer is not a
# training configuration anyone would run, so the solver says so instead. A
# noise multiplier above ~1e6 drowns any gradient signal (Opacus uses the same
# limit to declare a budget "too low"); below 2**-20 epsilon is astronomical.
_MAX_NOISE_MULTIPLIER = 2.0**20
_MIN_NOISE_MULTIPLIER = 2.0**-20
_MAX_STEPS = 2**40
_MAX_ITERATIONS = 200


def sampling_rate(batch_size: int, dataset_size: int) -> float:
    """The Poisson sampling rate q = B / N.

    Args:
      batch_size: Expected batch size B, an integer in [1, dataset_size].
      dataset_size: Number N of distinct training examples (never counting
        augmented copies), an integer >= 1.

    Returns:
      q = batch_size / dataset_size, a float in (0, 1].

    Raises:
      ValueError: if an argument is not an integer in its range, in particular
        when batch_size > dataset_size (q would exceed 1).
    """
    dataset_size = _validate.positive_int("dataset_size", dataset_size)
    batch_size = _validate.integer(
        "batch_size",
        batch_size,
        low=1,
        high=dataset_size,
        hint="The expected batch size cannot exceed dataset_size (q = B/N <= 1)",
    )
    return batch_size / dataset_size


def epochs_to_steps(epochs: float, batch_size: int, dataset_size: int) -> int:
    """The number of noisy updates that covers `epochs` passes over the data.

    An epoch is N / B steps in expectation; the count is rounded up so that a
    run sees at least the requested number of epochs.

    Args:
      epochs: Number of passes, a float > 0.
      batch_size: Expected batch size B, an integer in [1, dataset_size].
      dataset_size: Number N of distinct training examples, an integer >= 1.

    Returns:
      ceil(epochs * N / B), an integer >= 1.

    Raises:
      ValueError: if an argument is out of range.
    """
    epochs = _validate.positive("epochs", epochs)
    q = sampling_rate(batch_size, dataset_size)
    exact = epochs / q
    # epochs often comes from steps * B / N and does not round-trip exactly
    # (2500 steps may come back as 2500.0000000002); do not add a step for it.
    nearest = round(exact)
    if abs(exact - nearest) <= 1e-9 * max(1.0, exact):
        return max(1, int(nearest))
    return max(1, math.ceil(exact))


def steps_to_epochs(steps: int, batch_size: int, dataset_size: int) -> float:
    """The expected number of passes over the data that `steps` updates make.

    Args:
      steps: Number of noisy updates, an integer >= 0.
      batch_size: Expected batch size B, an integer in [1, dataset_size].
      dataset_size: Number N of distinct training examples, an integer >= 1.

    Returns:
      steps * B / N.

    Raises:
      ValueError: if an argument is out of range.
    """
    steps = _validate.integer("steps", steps, low=0)
    return steps * sampling_rate(batch_size, dataset_size)


def dp_event_for(noise_multiplier: float, sampling_rate: float, steps: int) -> dp_event.DpEvent:
    """The dp_accounting event of `steps` Poisson-sampled Gaussian updates.

    Args:
      noise_multiplier: sigma, the noise std divided by the clip norm, >= 0.
      sampling_rate: Poisson sampling rate q, a float in (0, 1].
      steps: Number of noisy updates, an integer >= 0.

    Returns:
      `SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)),
      steps)`, or `NoOpDpEvent()` when steps is 0 (dp_accounting rejects a
      composition count of 0).

    Raises:
      ValueError: if an argument is out of range.
    """
    sigma, q, steps = _check_run(noise_multiplier, sampling_rate, steps)
    if steps == 0:
        return dp_event.NoOpDpEvent()
    step = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma))
    return dp_event.SelfComposedDpEvent(step, steps)


def effective_noise_multiplier(
    noise_multiplier: float, count_noise_multiplier: Optional[float] = None
) -> float:
    """The noise multiplier that accounts a clipped sum released with a noisy count.

    DP-SGD with a privately released clipped fraction (Andrew et al. 2021,
    "Differentially Private Learning with Adaptive Clipping", Thm 1) adds,
    at every step, Gaussian noise of std sigma * C to the sum of clipped
    gradients and of std sigma_b to the count of clipped examples (each
    example adds at most 1 to it). In units of their noise stds, one
    example moves the pair by at most sqrt(1/sigma^2 + 1/sigma_b^2) in L2
    norm: the pair is ONE Poisson-sampled Gaussian mechanism with noise
    multiplier sigma_eff = (sigma^-2 + sigma_b^-2)^(-1/2), smaller than
    both. Accounting the two releases with sigma_eff is exact (no
    composition loss).

    Args:
      noise_multiplier: sigma of the gradient noise, a float >= 0.
      count_noise_multiplier: sigma_b, the std of the noise on the count, a
        float > 0, or None when no count is released.

    Returns:
      sigma_eff: `noise_multiplier` when `count_noise_multiplier` is None,
      0 when `noise_multiplier` is 0 (no noise on the gradient: not private).

    Raises:
      ValueError: if an argument is out of range.
    """
    sigma = _validate.non_negative("noise_multiplier", noise_multiplier)
    if count_noise_multiplier is None:
        return sigma
    sigma_b = _validate.positive("count_noise_multiplier", count_noise_multiplier)
    if sigma == 0.0:
        return 0.0
    return (sigma**-2 + sigma_b**-2) ** -0.5


def gradient_noise_multiplier(effective: float, count_noise_multiplier: float) -> float:
    """The gradient's sigma that, with a count noised by sigma_b, accounts as `effective`.

    The inverse of `effective_noise_multiplier`: sigma = (sigma_eff^-2 -
    sigma_b^-2)^(-1/2), which exists only when sigma_b > sigma_eff (the
    count alone must be noisier than the pair).

    Args:
      effective: sigma_eff, a float > 0 (e.g. from `calibrate_noise_multiplier`).
      count_noise_multiplier: sigma_b, a float > 0.

    Returns:
      sigma, a float > effective.

    Raises:
      ValueError: if an argument is out of range, or if
        count_noise_multiplier <= effective.
    """
    sigma_eff = _validate.positive("effective", effective)
    sigma_b = _validate.real(
        "count_noise_multiplier",
        count_noise_multiplier,
        low=sigma_eff,
        low_inclusive=False,
        hint="The noise of the count alone must exceed the effective noise multiplier",
    )
    gap = sigma_eff**-2 - sigma_b**-2
    if gap <= 0.0:  # sigma_b above sigma_eff by less than round-off: no finite sigma
        raise _validate.invalid(
            "count_noise_multiplier",
            f"a float clearly above effective={sigma_eff!r}",
            count_noise_multiplier,
        )
    return gap**-0.5


def shuffled_dp_event(noise_multiplier: float, epochs: int) -> dp_event.DpEvent:
    """The event of DP-SGD on shuffled fixed-size batches, without amplification.

    When every epoch cuts the N examples into a partition of fixed-size
    batches (as `fit(x, y, batch_size=B)` does), an example takes part in
    exactly one update per epoch. Replacing it by another example (datasets
    of equal size: replace-one adjacency) moves that batch's sum of clipped
    gradients by at most 2C and no other batch's sum. Each epoch is then at
    most one Gaussian mechanism with noise multiplier sigma / 2 (the other
    updates, chosen adaptively, are post-processing). No amplification by
    shuffling is claimed: no sound one is known to apply to this setting
    without extra assumptions (Chua et al. 2024 measure that the Poisson
    number would under-report it).

    Args:
      noise_multiplier: sigma, the noise std divided by the clip norm, >= 0.
      epochs: Epochs in which at least one update was released, >= 0.

    Returns:
      `SelfComposedDpEvent(GaussianDpEvent(sigma / 2), epochs)`, or
      `NoOpDpEvent()` for 0 epochs.

    Raises:
      ValueError: if an argument is out of range.
    """
    sigma = _validate.non_negative("noise_multiplier", noise_multiplier)
    epochs = _validate.integer("epochs", epochs, low=0)
    if epochs == 0:
        return dp_event.NoOpDpEvent()
    return dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(sigma / 2.0), epochs)


def compute_shuffled_epsilon(
    noise_multiplier: float, epochs: int, delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon of `shuffled_dp_event` (replace-one adjacency) at `delta`.

    Args:
      noise_multiplier: sigma, >= 0; 0 gives math.inf after one epoch.
      epochs: Epochs in which at least one update was released, >= 0.
      delta: Target delta, a float in (0, 1).
      accountant: "rdp" (default) or "pld".

    Returns:
      Epsilon, a float >= 0.

    Raises:
      ValueError: if an argument is out of range.
    """
    event = shuffled_dp_event(noise_multiplier, epochs)
    delta = _validate.delta("delta", delta)
    accountant = _validate.one_of("accountant", accountant, ACCOUNTANTS)
    if epochs == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    if accountant == "rdp":
        return float(rdp.RdpAccountant().compose(event).get_epsilon(delta))
    return float(pld.PLDAccountant().compose(event).get_epsilon(delta))


def compute_epsilon(
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """Epsilon of DP-SGD with Poisson sampling after `steps` noisy updates.

    Args:
      noise_multiplier: sigma, >= 0. 0 means no noise: epsilon is infinite.
      sampling_rate: Poisson sampling rate q = B/N, a float in (0, 1].
      steps: Number of noisy updates, an integer >= 0. 0 gives epsilon 0.
      delta: Target delta, a float in (0, 1).
      accountant: "rdp" (default) or "pld". With "pld", configurations whose
        RDP epsilon exceeds `PLD_MAX_EPSILON` (a number that already means "not
        private") or with more than `PLD_MAX_STEPS` steps return the RDP
        epsilon, a valid but looser bound: there the PLD would cost seconds to
        minutes and gigabytes.

    Returns:
      The smallest epsilon the accountant certifies at `delta`, a float >= 0
      (math.inf when noise_multiplier is 0 and steps > 0).

    Raises:
      ValueError: if an argument is out of range.
    """
    sigma, q, steps = _check_run(noise_multiplier, sampling_rate, steps)
    delta = _validate.delta("delta", delta)
    accountant = _validate.one_of("accountant", accountant, ACCOUNTANTS)
    return _epsilon(sigma, q, steps, delta, accountant)


def calibrate_noise_multiplier(
    target_epsilon: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
    tolerance: float = 0.01,
) -> float:
    """The noise multiplier that spends (almost exactly) `target_epsilon`.

    A bracketed search on log(sigma) (false position, bisection as fallback)
    keeps eps(sigma_lo) > target >= eps(sigma_hi); only sigma_hi is ever
    returned, so the result never overshoots the budget.

    Args:
      target_epsilon: Privacy budget, a float > 0.
      sampling_rate: Poisson sampling rate q, a float in (0, 1].
      steps: Number of noisy updates, an integer >= 1.
      delta: Target delta, a float in (0, 1).
      accountant: "rdp" or "pld".
      tolerance: How much of the budget may be left unspent, a float > 0.

    Returns:
      sigma with eps(sigma) <= target_epsilon and, wherever the accountant's
      epsilon is continuous in sigma, target_epsilon - tolerance <= eps(sigma).
      Where it jumps across that window (dp_accounting's RDP conversion snaps
      to 0 for divergences below ~delta**2), sigma is the smallest noise
      multiplier within budget, to 1e-9 relative.

    Raises:
      ValueError: if an argument is out of range, or if target_epsilon cannot
        be reached with a noise multiplier in [2**-20, 2**20]: a budget so
        low that more than ~1e6 would be needed, or so high that it certifies
        no meaningful privacy.
    """
    target = _validate.positive("target_epsilon", target_epsilon)
    q = _validate.sampling_rate("sampling_rate", sampling_rate)
    steps = _validate.positive_int("steps", steps)
    delta = _validate.delta("delta", delta)
    accountant = _validate.one_of("accountant", accountant, ACCOUNTANTS)
    tolerance = _validate.positive("tolerance", tolerance)

    def eps(sigma: float) -> float:
        return _epsilon(sigma, q, steps, delta, accountant)

    # Start from the TAN estimate: exact epsilon is within ~10% of eps_TAN
    # for sigma >~ 2, so the bracket is usually found in two or three
    # accountant calls. That matters at large sigma, where dp_accounting's
    # fractional-order RDP series costs up to ~1.5 s per call (sigma ~ 600).
    guess = tan.noise_multiplier_for_eta(tan.eta_for_epsilon(target, delta), q, steps)
    guess = min(_MAX_NOISE_MULTIPLIER, max(_MIN_NOISE_MULTIPLIER, guess))
    if accountant == "pld":
        # PLD calls cost 10-100x RDP ones, most at small sigma, where eps_TAN
        # is a poor guess. The RDP answer is a better one: PLD <= RDP, so it
        # is within budget and (measured) 5-15% above the PLD answer.
        try:
            guess = calibrate_noise_multiplier(
                target, q, steps, delta, "rdp", max(tolerance, 0.05 * target)
            )
        except ValueError:
            pass  # out of the RDP's reach: search from eps_TAN

    # Bracket [lo, hi] with eps(lo) > target >= eps(hi); the step squares on
    # each move (1.25, 1.56, 2.4, 6, 35, ...) so a poor guess costs little.
    hi, eps_hi, factor = guess, eps(guess), 1.25
    lo, eps_lo = None, None
    while eps_hi > target:
        if hi >= _MAX_NOISE_MULTIPLIER:
            raise _validate.invalid(
                "target_epsilon",
                f"a budget reachable with noise_multiplier <= 2**20 (even "
                f"noise_multiplier={hi:g} gives epsilon={eps_hi:.4g} at "
                f"sampling_rate={q:g}, steps={steps}, delta={delta:g})",
                target_epsilon,
                hint="The budget is too low: raise it, or lower the batch size "
                "or the number of steps",
            )
        lo, eps_lo = hi, eps_hi
        hi = min(_MAX_NOISE_MULTIPLIER, hi * factor)
        eps_hi, factor = eps(hi), factor * factor
    factor = 1.25
    while lo is None or eps_lo <= target:
        if hi <= _MIN_NOISE_MULTIPLIER:
            raise _validate.invalid(
                "target_epsilon",
                f"a budget that needs noise_multiplier > {_MIN_NOISE_MULTIPLIER:g} "
                f"(epsilon={target:g} is met by any larger noise and certifies "
                "no meaningful privacy)",
                target_epsilon,
            )
        if lo is not None:
            hi, eps_hi = lo, eps_lo
        lo = max(_MIN_NOISE_MULTIPLIER, hi / factor)
        eps_lo, factor = eps(lo), factor * factor

    # Shrink the bracket until the budget is spent to within `tolerance`.
    # Illinois (safeguarded false position) on log(eps) against log(sigma),
    # where the curve is nearly straight (eps ~ 1/sigma at large sigma), aimed
    # at the middle of the acceptance window: ~4 accountant calls instead of
    # ~10 for bisection. It falls back to bisection where log(eps) is not
    # finite. Only points within budget ever become `hi`, the value returned.
    #
    # The bracket can also collapse to round-off without meeting the
    # tolerance: where the accountant's epsilon jumps. dp_accounting's RDP
    # conversion drops to exactly 0 once the divergence is below ~delta**2
    # (e.g. q = 1e-3, S = 1, delta = 1e-3: from 0.26 to 0), so targets inside
    # the jump cannot be met more closely; `hi` is then the smallest noise
    # multiplier within budget.
    log_aim = math.log(target - tolerance / 2.0) if target > tolerance else None
    x_lo, x_hi = math.log(lo), math.log(hi)
    g_lo, g_hi = _log_gap(eps_lo, log_aim), _log_gap(eps_hi, log_aim)
    kept = 0  # +1: hi moved last (lo kept), -1: lo moved last
    for _ in range(_MAX_ITERATIONS):
        if target - eps_hi <= tolerance or x_hi - x_lo <= 1e-9:
            break
        x = 0.5 * (x_lo + x_hi)
        if g_lo is not None and g_hi is not None and g_lo > 0 > g_hi:
            secant = x_hi - g_hi * (x_hi - x_lo) / (g_hi - g_lo)
            if x_lo < secant < x_hi:
                x = secant
        sigma = math.exp(x)
        eps_x = eps(sigma)
        if eps_x <= target:
            x_hi, hi, eps_hi, g_hi = x, sigma, eps_x, _log_gap(eps_x, log_aim)
            if kept == 1 and g_lo is not None:
                g_lo /= 2.0  # Illinois: lo kept twice, pull the secant to it
            kept = 1
        else:
            x_lo, g_lo = x, _log_gap(eps_x, log_aim)
            if kept == -1 and g_hi is not None:
                g_hi /= 2.0
            kept = -1
    return hi


def calibrate_steps(
    target_epsilon: float,
    noise_multiplier: float,
    sampling_rate: float,
    delta: float,
    accountant: str = "rdp",
) -> int:
    """The largest number of noisy updates whose epsilon is within budget.

    Args:
      target_epsilon: Privacy budget, a float > 0.
      noise_multiplier: sigma, a float > 0.
      sampling_rate: Poisson sampling rate q, a float in (0, 1].
      delta: Target delta, a float in (0, 1).
      accountant: "rdp" or "pld".

    Returns:
      The largest S >= 1 with eps(S) <= target_epsilon.

    Raises:
      ValueError: if an argument is out of range, if a single step already
        exceeds the budget, or if more than 2**40 steps fit in it.
    """
    target = _validate.positive("target_epsilon", target_epsilon)
    sigma = _validate.positive("noise_multiplier", noise_multiplier)
    q = _validate.sampling_rate("sampling_rate", sampling_rate)
    delta = _validate.delta("delta", delta)
    accountant = _validate.one_of("accountant", accountant, ACCOUNTANTS)

    def within(steps: int) -> bool:
        return _epsilon(sigma, q, steps, delta, accountant) <= target

    if not within(1):
        one = _epsilon(sigma, q, 1, delta, accountant)
        raise _validate.invalid(
            "target_epsilon",
            f"at least the epsilon of one step ({one:.4g} with "
            f"noise_multiplier={sigma:g}, sampling_rate={q:g}, delta={delta:g})",
            target_epsilon,
            hint="Raise noise_multiplier or lower the batch size",
        )
    steps = _largest_within(within, 1, _MAX_STEPS)
    if steps == _MAX_STEPS:
        raise _validate.invalid(
            "target_epsilon",
            f"a budget that at most {_MAX_STEPS} steps exhaust",
            target_epsilon,
            hint="Check noise_multiplier and sampling_rate",
        )
    return steps


def calibrate_batch_size(
    target_epsilon: float,
    noise_multiplier: float,
    steps: int,
    dataset_size: int,
    delta: float,
    accountant: str = "rdp",
) -> int:
    """The largest expected batch size whose epsilon is within budget.

    Args:
      target_epsilon: Privacy budget, a float > 0.
      noise_multiplier: sigma, a float > 0.
      steps: Number of noisy updates, an integer >= 1.
      dataset_size: Number N of distinct training examples, an integer >= 1.
      delta: Target delta, a float in (0, 1).
      accountant: "rdp" or "pld".

    Returns:
      The largest B in [1, N] with eps(q = B/N) <= target_epsilon.

    Raises:
      ValueError: if an argument is out of range, or if even B = 1 exceeds
        the budget.
    """
    target = _validate.positive("target_epsilon", target_epsilon)
    sigma = _validate.positive("noise_multiplier", noise_multiplier)
    steps = _validate.positive_int("steps", steps)
    n = _validate.positive_int("dataset_size", dataset_size)
    delta = _validate.delta("delta", delta)
    accountant = _validate.one_of("accountant", accountant, ACCOUNTANTS)

    def within(batch_size: int) -> bool:
        return _epsilon(sigma, batch_size / n, steps, delta, accountant) <= target

    if not within(1):
        one = _epsilon(sigma, 1 / n, steps, delta, accountant)
        raise _validate.invalid(
            "target_epsilon",
            f"at least the epsilon of batch_size=1 ({one:.4g} with "
            f"noise_multiplier={sigma:g}, steps={steps}, dataset_size={n})",
            target_epsilon,
            hint="Raise noise_multiplier or use fewer steps",
        )
    return _largest_within(within, 1, n)


@dataclasses.dataclass(frozen=True)
class PrivacyQuery:
    """One accounting question: the epsilon of a DP-SGD run at a given delta.

    Validated on construction; derived values are computed, never stored.

    Attributes:
      noise_multiplier: sigma, >= 0.
      sampling_rate: Poisson sampling rate q, in (0, 1].
      steps: Number of noisy updates, >= 0.
      delta: Target delta, in (0, 1).
      accountant: "rdp" or "pld".
    """

    noise_multiplier: float
    sampling_rate: float
    steps: int
    delta: float
    accountant: str = "rdp"

    def __post_init__(self):
        sigma, q, steps = _check_run(self.noise_multiplier, self.sampling_rate, self.steps)
        # Store the normalized values (Python float / int) so that equal
        # queries compare and hash equal.
        object.__setattr__(self, "noise_multiplier", sigma)
        object.__setattr__(self, "sampling_rate", q)
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "delta", _validate.delta("delta", self.delta))
        _validate.one_of("accountant", self.accountant, ACCOUNTANTS)

    @property
    def event(self) -> dp_event.DpEvent:
        """The composed dp_accounting event (see `dp_event_for`)."""
        return dp_event_for(self.noise_multiplier, self.sampling_rate, self.steps)

    def epsilon(self) -> float:
        """Epsilon at `delta` (see `compute_epsilon`)."""
        return _epsilon(
            self.noise_multiplier,
            self.sampling_rate,
            self.steps,
            self.delta,
            self.accountant,
        )


def _check_run(noise_multiplier, sampling_rate, steps):
    return (
        _validate.non_negative("noise_multiplier", noise_multiplier),
        _validate.sampling_rate("sampling_rate", sampling_rate),
        _validate.integer("steps", steps, low=0),
    )


def _epsilon(sigma: float, q: float, steps: int, delta: float, accountant: str):
    """compute_epsilon on validated arguments (the solvers call it many times)."""
    if steps == 0:
        return 0.0
    if sigma == 0.0:
        return math.inf
    eps_rdp = _rdp_epsilon(sigma, q, steps, delta)
    if accountant == "rdp" or eps_rdp > PLD_MAX_EPSILON or steps > PLD_MAX_STEPS:
        return eps_rdp
    event = dp_event_for(sigma, q, steps)
    interval = min(_PLD_INTERVAL_MAX, _PLD_INTERVAL_PER_LOSS_SCALE * q / sigma)
    pld_accountant = pld.PLDAccountant(value_discretization_interval=interval)
    return float(pld_accountant.compose(event).get_epsilon(delta))


def _rdp_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    # RDP composes linearly: S steps have S times the per-step divergences
    # (RdpAccountant does exactly `count * rdp` for a SelfComposedDpEvent), so
    # the expensive per-step series is computed once per (sigma, q) and the
    # solvers' many step counts cost only the conversion.
    divergences = steps * _per_step_rdp(sigma, q)
    # Renyi divergences are >= 0, but at very large sigma the library's float
    # arithmetic returns values like -3.6e-14, which its own conversion then
    # rejects. Clip that round-off to 0 before converting.
    eps, _ = rdp_privacy_accountant.compute_epsilon(
        _RDP_ORDERS, np.maximum(divergences, 0.0), delta
    )
    return float(eps)


_RDP_ORDERS = rdp.RdpAccountant().orders


@functools.lru_cache(maxsize=1024)
def _per_step_rdp(sigma: float, q: float) -> np.ndarray:
    step = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma))
    divergences = rdp.RdpAccountant().compose(step).rdp
    divergences.flags.writeable = False  # shared by every caller of the cache
    return divergences


def _log_gap(eps: float, log_aim: Optional[float]) -> Optional[float]:
    """log(eps) - log(aim), or None where that is not a finite number."""
    if log_aim is None or not 0.0 < eps < math.inf:
        return None
    return math.log(eps) - log_aim


def _largest_within(within: Callable[[int], bool], ok: int, limit: int) -> int:
    """Largest integer x in [ok, limit] with within(x), given within(ok).

    Galloping then bisection: O(log x) accountant calls. Epsilon is
    non-decreasing in steps and batch size; the returned value is always one
    for which `within` was evaluated True, so monotonicity only affects
    optimality, never the budget.
    """
    bad = None
    while bad is None:
        probe = min(2 * ok, limit)
        if probe == ok:
            return ok
        if within(probe):
            ok = probe
        else:
            bad = probe
    while bad - ok > 1:
        mid = (ok + bad) // 2
        if within(mid):
            ok = mid
        else:
            bad = mid
    return ok
