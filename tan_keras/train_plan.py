"""The privacy plan of a training run, computed and printed before training.

Given the run's settings and the dataset size N, `plan_privacy` fixes the
noise multiplier sigma and computes what the run will spend:

  * --target_eps (default 8): sigma calibrated from (B, S, N, delta) so that
    epsilon never exceeds the target;
  * --noise_multiplier: sigma as given;
  * --ref_batch_size/--ref_noise_multiplier (simulation): sigma =
    ref_sigma * B / B_ref, so S and sigma/B -- hence eta -- match the
    reference run. The simulation itself is NOT private; the reference's
    epsilon is shown to say what the full-size run would guarantee.

Epsilon comes from the accountant (the number to report); eta and eps_TAN
are the TAN planning quantities (tan-method.md section 2).
"""

import dataclasses
import math
from typing import Any, Dict, List, Optional

from tan_keras import _validate
from tan_keras.privacy import accounting, planning, tan
from tan_keras.train_config import TrainConfig


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
    """What a run will spend; derived values are properties.

    Attributes:
      mode: "target_eps", "noise_multiplier" or "simulation".
      dataset_size: N, distinct training examples.
      batch_size: B, the expected (Poisson) batch size.
      noise_multiplier: sigma of this run.
      steps: S, noisy updates.
      augmult: K, views per example (compute only).
      delta: Target delta.
      accountant: "rdp" or "pld".
      epsilon: This run's epsilon after S updates (math.inf without noise).
      target_epsilon: The calibration target ("target_eps" mode), else None.
      noise_seeded: Whether --noise_seed made noise and sampling reproducible.
      reference: The simulated private run (simulation mode), else None.
      warnings: Sentences to print with the plan.
    """

    mode: str
    dataset_size: int
    batch_size: int
    noise_multiplier: float
    steps: int
    augmult: int
    delta: float
    accountant: str
    epsilon: float
    target_epsilon: Optional[float] = None
    noise_seeded: bool = False
    reference: Optional[planning.RunPrivacy] = None
    warnings: tuple = ()

    @property
    def sampling_rate(self) -> float:
        """q = B / N."""
        return self.batch_size / self.dataset_size

    @property
    def eta(self) -> float:
        """Total Amount of Noise of the S planned updates."""
        return self.eta_after(self.steps)

    def eta_after(self, steps: int) -> float:
        """Total Amount of Noise after `steps` updates (inf without noise)."""
        if self.noise_multiplier == 0:
            return math.inf
        return tan.eta(self.noise_multiplier, self.sampling_rate, steps)

    @property
    def eps_tan(self) -> float:
        """The TAN estimate of epsilon (a planning tool, not a guarantee)."""
        return tan.eps_tan(self.eta, self.delta)

    @property
    def gradient_evaluations(self) -> int:
        """Expected per-view gradient evaluations S * B * K."""
        return self.steps * self.batch_size * self.augmult

    @property
    def simulation(self) -> bool:
        """Whether this run simulates a larger private one."""
        return self.reference is not None

    @property
    def private(self) -> bool:
        """Whether `epsilon` is a guarantee this run may claim.

        False for a simulation, a run without noise, or a run whose noise and
        sampling were seeded (anyone who knows the seed can undo them).
        """
        return (
            not self.simulation
            and not self.noise_seeded
            and self.noise_multiplier > 0
            and math.isfinite(self.epsilon)
        )

    @property
    def compute_saving(self) -> Optional[float]:
        """B_ref / B in simulation mode, else None."""
        return self.reference.batch_size / self.batch_size if self.simulation else None

    def to_dict(self) -> Dict[str, Any]:
        """The plan's numbers as a flat JSON-ready dict (inf -> None)."""
        ref = self.reference
        return _finite(
            {
                "epsilon": self.epsilon,
                "delta": self.delta,
                "eta": self.eta,
                "eps_tan": self.eps_tan,
                "noise_multiplier": self.noise_multiplier,
                "sampling_rate": self.sampling_rate,
                "batch_size": self.batch_size,
                "steps": self.steps,
                "augmult": self.augmult,
                "gradient_evaluations": self.gradient_evaluations,
                "dataset_size": self.dataset_size,
                "accountant": self.accountant,
                "target_epsilon": self.target_epsilon,
                "simulation": self.simulation,
                "private": self.private,
                "reference_epsilon": ref.epsilon if ref else None,
                "reference_eta": ref.eta if ref else None,
                "reference_batch_size": ref.batch_size if ref else None,
                "reference_noise_multiplier": ref.noise_multiplier if ref else None,
                "compute_saving": self.compute_saving,
            }
        )


def plan_privacy(config: TrainConfig, dataset_size: int) -> PrivacyPlan:
    """Fixes sigma for `config` on N examples and computes the run's privacy.

    Args:
      config: The validated run settings.
      dataset_size: N, the number of distinct training examples.

    Returns:
      The `PrivacyPlan`.

    Raises:
      ValueError: naming the flag, if B or B_ref exceeds N, or the target
        epsilon cannot be met.
    """
    n = _validate.positive_int("dataset_size", dataset_size)
    for name in ("batch_size", "ref_batch_size"):
        value = getattr(config, name)
        if value is not None and value > n:
            raise _validate.invalid(
                name,
                f"an integer in [1, {n}] (the dataset has N={n} training examples; "
                "q = B/N cannot exceed 1)",
                value,
            )
    b, steps, delta = config.batch_size, config.steps, config.delta
    q = b / n
    reference, target = None, None
    if config.noise_mode == "simulation":
        sim = planning.plan_simulation(
            ref_batch_size=config.ref_batch_size,
            ref_noise_multiplier=config.ref_noise_multiplier,
            steps=steps,
            dataset_size=n,
            delta=delta,
            batch_size=b,
            augmult=config.augmult,
            accountant=config.accountant,
        )
        reference = sim.reference
        sigma, epsilon = sim.simulation.noise_multiplier, sim.simulation.epsilon
    elif config.noise_mode == "noise_multiplier":
        sigma = config.noise_multiplier
        epsilon = accounting.compute_epsilon(sigma, q, steps, delta, config.accountant)
    else:
        target = config.target_eps
        try:
            sigma = accounting.calibrate_noise_multiplier(
                target, q, steps, delta, config.accountant
            )
        except ValueError as err:
            # The library names its argument `target_epsilon`; the user typed
            # --target_eps, and the message must name what they typed.
            raise ValueError(str(err).replace("target_epsilon", "target_eps")) from None
        epsilon = accounting.compute_epsilon(sigma, q, steps, delta, config.accountant)
    return PrivacyPlan(
        mode=config.noise_mode,
        dataset_size=n,
        batch_size=b,
        noise_multiplier=sigma,
        steps=steps,
        augmult=config.augmult,
        delta=delta,
        accountant=config.accountant,
        epsilon=epsilon,
        target_epsilon=target,
        noise_seeded=config.noise_seed is not None,
        reference=reference,
        warnings=tuple(_warnings(config, n, sigma)),
    )


def _warnings(config: TrainConfig, n: int, sigma: float) -> List[str]:
    notes = []
    if config.delta >= 1.0 / n:
        notes.append(
            f"delta={config.delta:g} is not below 1/N={1.0 / n:.3g}; the usual rule is "
            "delta << 1/N (releasing one random example in the clear has delta = 1/N)."
        )
    if config.noise_mode != "simulation" and 0 < sigma < tan.OVERCHARGE_SIGMA:
        notes.append(
            f"noise_multiplier={sigma:.4g} < {tan.OVERCHARGE_SIGMA:g}: the run is "
            "overcharged (epsilon well above eps_TAN). A larger batch at the same "
            "sigma/B keeps eta and costs less epsilon."
        )
    return notes


def format_plan(plan: PrivacyPlan, dataset: str) -> str:
    """The plan as text for a person, printed before training.

    Args:
      plan: The `PrivacyPlan`.
      dataset: Dataset name, for the header.

    Returns:
      Multi-line text without a trailing newline.
    """
    if plan.mode == "target_eps":
        how = f"calibrated for target_eps={plan.target_epsilon:g}"
    elif plan.mode == "noise_multiplier":
        how = "from --noise_multiplier"
    else:
        how = "ref_noise_multiplier * batch_size / ref_batch_size"
    epochs = plan.steps * plan.sampling_rate
    lines = [
        f"Privacy plan ({plan.accountant} accountant, Poisson sampling)",
        f"  dataset              {dataset}, N={plan.dataset_size} training examples",
        f"  batch_size B         {plan.batch_size}  (q = B/N = {plan.sampling_rate:.4g})",
        f"  noise_multiplier     {plan.noise_multiplier:.4g}  ({how})",
        f"  sigma/B              {_num(plan.noise_multiplier / plan.batch_size)}",
        f"  steps S              {plan.steps}  (noisy updates, {epochs:.3g} epochs)",
        f"  augmult K            {plan.augmult}",
        f"  gradient evals S*B*K {plan.gradient_evaluations:,}",
        f"  delta                {plan.delta:g}",
        f"  epsilon              {_num(plan.epsilon)}  (this run)",
        f"  eta (TAN)            {_num(plan.eta)}",
        f"  eps_TAN              {_num(plan.eps_tan)}",
    ]
    ref = plan.reference
    if ref is not None:
        lines += [
            "  reference run        "
            f"batch_size={ref.batch_size} noise_multiplier={ref.noise_multiplier:.4g} "
            f"steps={ref.steps}",
            f"  reference epsilon    {_num(ref.epsilon)}",
            f"  reference eta        {_num(ref.eta)}  (equal to this run's: same S and sigma/B)",
            f"  compute saving       {plan.compute_saving:.4g}x  (ref_batch_size / batch_size)",
            "NOT PRIVATE: this simulated run is NOT private. It reproduces the training "
            "dynamics of the reference run at a fraction of the cost, to tune "
            "hyper-parameters; only the reference run, once trained, guarantees "
            f"epsilon={_num(ref.epsilon)} at delta={plan.delta:g}.",
        ]
    elif plan.noise_multiplier == 0:
        lines.append("NOT PRIVATE: --noise_multiplier=0 adds no noise (epsilon is infinite).")
    if plan.noise_seeded:
        lines.append(
            "NOT PRIVATE: --noise_seed makes the noise and the Poisson batches "
            "reproducible; anyone who knows the seed can undo them. Debugging only."
        )
    if plan.private:
        lines.append(
            f"Private: this run guarantees ({_num(plan.epsilon)}, {plan.delta:g})-DP "
            "for each training example."
        )
    lines += [f"Warning: {note}" for note in plan.warnings]
    return "\n".join(lines)


def _num(value: Optional[float]) -> str:
    if value is None or not math.isfinite(value):
        return "inf"
    return f"{value:.4g}"


def _finite(record: Dict[str, Any]) -> Dict[str, Any]:
    return {
        key: None if isinstance(value, float) and not math.isfinite(value) else value
        for key, value in record.items()
    }
