"""The overcharged regime: a run whose exact epsilon is far above eps_TAN.

Below sigma ~ 2 the per-step privacy loss of the subsampled Gaussian grows
faster than the TAN approximation assumes, so a run pays more epsilon than
its Total Amount of Noise predicts (Sander et al., ICML 2023, Section 3).
`check_overcharge` compares the accountant's epsilon with eps_TAN and says
what to change.
"""

import dataclasses

from tan_keras import _numbers, _validate
from tan_keras.privacy import accounting, tan


@dataclasses.dataclass(frozen=True)
class OverchargeReport:
    """How the exact epsilon of a run compares with its TAN estimate.

    Attributes:
      noise_multiplier: sigma of the run.
      sampling_rate: q of the run.
      steps: S of the run.
      delta: Target delta.
      epsilon: Exact epsilon from the accountant.
      eps_tan: The TAN estimate eps_TAN(eta, delta).
      eta: Total Amount of Noise of the run.
      ratio: epsilon / eps_tan (>= ~1; well above 1 when overcharged).
      overcharged: True when sigma < tan.OVERCHARGE_SIGMA.
    """

    noise_multiplier: float
    sampling_rate: float
    steps: int
    delta: float
    epsilon: float
    eps_tan: float
    eta: float
    ratio: float
    overcharged: bool

    @property
    def message(self) -> str:
        """A plain-words explanation of the verdict, one paragraph."""
        sigma = self.noise_multiplier
        numbers = (
            f"epsilon={_numbers.short(self.epsilon)} vs eps_TAN={_numbers.short(self.eps_tan)} "
            f"(ratio {_numbers.short(self.ratio)}) at eta={self.eta:.4g}"
        )
        if not self.overcharged:
            return (
                f"Not overcharged: noise_multiplier={sigma:g} >= "
                f"{tan.OVERCHARGE_SIGMA:g}, so the privacy budget is spent about as the "
                f"TAN estimate predicts (eps_TAN is then close, often slightly "
                f"above); {numbers}."
            )
        text = (
            f"Overcharged: noise_multiplier={sigma:g} < {tan.OVERCHARGE_SIGMA:g}, so "
            "the privacy budget is spent faster than the TAN estimate predicts; "
            f"{numbers}. Raising sigma and the batch size together at a fixed "
            "sigma/B keeps eta (and the training dynamics) but buys it for less "
            "epsilon."
        )
        if sigma < tan.NO_PRIVACY_SIGMA:
            text += (
                f" Below noise_multiplier ~{tan.NO_PRIVACY_SIGMA:g} there is no "
                "meaningful epsilon at all: treat this run as not private."
            )
        return text


def check_overcharge(
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
) -> OverchargeReport:
    """Compares a run's exact epsilon with its TAN estimate.

    Args:
      noise_multiplier: sigma, a float > 0.
      sampling_rate: Poisson sampling rate q, a float in (0, 1].
      steps: Number of noisy updates, an integer >= 1.
      delta: Target delta, a float in (0, 1).
      accountant: "rdp" or "pld", for the exact epsilon.

    Returns:
      An `OverchargeReport`; its `message` explains the verdict.

    Raises:
      ValueError: if an argument is out of range.
    """
    sigma = _validate.positive("noise_multiplier", noise_multiplier)
    q = _validate.sampling_rate("sampling_rate", sampling_rate)
    steps = _validate.positive_int("steps", steps)
    delta = _validate.delta("delta", delta)
    epsilon = accounting.compute_epsilon(sigma, q, steps, delta, accountant)
    total = tan.eta(sigma, q, steps)
    estimate = tan.eps_tan(total, delta)
    return OverchargeReport(
        noise_multiplier=sigma,
        sampling_rate=q,
        steps=steps,
        delta=delta,
        epsilon=epsilon,
        eps_tan=estimate,
        eta=total,
        ratio=epsilon / estimate,
        overcharged=sigma < tan.OVERCHARGE_SIGMA,
    )
