"""The privacy plan of a run: how its noise is set and what it will spend.

Every command line plans privacy the same way (`python -m tan_keras.train`
before training, `python -m tan_keras.privacy`, the search's final run):

  * `noise_mode` is the one rule for how the noise is given: a target
    epsilon (sigma calibrated so that epsilon never exceeds it), a noise
    multiplier, or a simulation of a private reference run (B_ref,
    sigma_ref): sigma = sigma_ref * B / B_ref, so S and sigma/B -- hence
    eta -- match the reference. A simulation is NOT private.
  * `make_plan` fixes sigma for N examples and computes the run's epsilon
    (the accountant: the number to report), eta and eps_TAN (the TAN
    planning quantities, docs/tan-method.md, section 2) and the warnings.
  * A run that also releases a noisy clipped fraction (`clipped_fraction_std`
    s: the count of clipped examples gets noise of std sigma_b = s * B) is
    accounted as one Gaussian mechanism with the effective noise multiplier
    sigma_eff = (sigma^-2 + sigma_b^-2)^(-1/2)
    (`accounting.effective_noise_multiplier`): epsilon, eta and eps_TAN use
    it; a target epsilon calibrates sigma_eff, and sigma follows from it.
"""

import dataclasses
import math
from typing import Any, Dict, List, Optional

from tan_keras import _validate
from tan_keras._numbers import json_safe
from tan_keras.privacy import accounting, planning, tan

NOISE_MODES = ("target_eps", "noise_multiplier", "simulation")


def noise_mode(
    *,
    target_eps: Any = None,
    noise_multiplier: Any = None,
    ref_batch_size: Any = None,
    ref_noise_multiplier: Any = None,
    batch_size: Any = None,
) -> str:
    """How the noise is set; exactly one way may be given.

    Args:
      target_eps: Epsilon to calibrate sigma for, or None.
      noise_multiplier: sigma, or None.
      ref_batch_size: B_ref of the private run a simulation simulates, or None.
      ref_noise_multiplier: sigma_ref of that run, or None.
      batch_size: B of this run, checked against B_ref in a simulation (None:
        not checked here).

    Returns:
      "simulation" (both ref values given), "noise_multiplier", or
      "target_eps" (also when nothing is given: the caller's default target
      applies, or it asks for a value).

    Raises:
      ValueError: naming the flag, when the ways are mixed, a simulation
        lacks one of its two values, or its batch is larger than B_ref.
    """
    reference = {"ref_batch_size": ref_batch_size, "ref_noise_multiplier": ref_noise_multiplier}
    if any(value is not None for value in reference.values()):
        for missing, given in (
            ("ref_batch_size", "ref_noise_multiplier"),
            ("ref_noise_multiplier", "ref_batch_size"),
        ):
            if reference[missing] is None:
                raise _validate.invalid(
                    missing, f"a value, since --{given} is given (a simulation needs both)", None
                )
        for name, value in (("noise_multiplier", noise_multiplier), ("target_eps", target_eps)):
            if value is not None:
                raise _validate.invalid(
                    name,
                    "unset in a simulation (--ref_batch_size/--ref_noise_multiplier set the "
                    "noise: sigma = ref_noise_multiplier * batch_size / ref_batch_size)",
                    value,
                )
        ref_batch_size = _validate.positive_int("ref_batch_size", ref_batch_size)
        if batch_size is not None:
            _validate.integer(
                "batch_size",
                batch_size,
                low=1,
                high=ref_batch_size,
                hint="A simulation is a smaller, cheaper run than the private run it "
                "simulates (ref_batch_size)",
            )
        return "simulation"
    if noise_multiplier is not None:
        if target_eps is not None:
            raise _validate.invalid(
                "target_eps",
                "unset when --noise_multiplier is given (give one of them)",
                target_eps,
            )
        return "noise_multiplier"
    return "target_eps"


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
    """What a run will spend; derived values are properties.

    Attributes:
      mode: One of `NOISE_MODES`.
      dataset_size: N, distinct training examples.
      batch_size: B, the expected (Poisson) batch size.
      noise_multiplier: sigma of this run.
      steps: S, noisy updates.
      augmult: K, views per example (compute only).
      delta: Target delta.
      accountant: "rdp" or "pld".
      epsilon: This run's epsilon after S updates (math.inf without noise).
      target_epsilon: The calibration target ("target_eps" mode), else None.
      noise_seeded: Whether the noise and sampling were seeded (reproducible
        by anyone who knows the seed, so not private).
      reference: The simulated private run (simulation mode), else None.
      warnings: Sentences to print with the plan.
      reference_dataset_size: N of the simulated private run (simulation
        mode; differs from `dataset_size` when this run trains on a tuning
        split held out of the private set), else None.
      clipped_fraction_std: The std s of the noisy clipped fraction the run
        releases (the count's noise is s * B), or None. A simulation keeps s,
        so its reference releases the fraction with the same std (count
        noise s * B_ref).
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
    reference_dataset_size: Optional[int] = None
    clipped_fraction_std: Optional[float] = None

    @property
    def sampling_rate(self) -> float:
        """q = B / N."""
        return self.batch_size / self.dataset_size

    @property
    def clipped_count_noise_std(self) -> Optional[float]:
        """sigma_b = clipped_fraction_std * B, the noise std on the clipped count (None: off)."""
        if self.clipped_fraction_std is None:
            return None
        return self.clipped_fraction_std * self.batch_size

    @property
    def accounted_noise_multiplier(self) -> float:
        """The sigma that accounts the run: `noise_multiplier`, or sigma_eff with a noisy count."""
        return accounting.effective_noise_multiplier(
            self.noise_multiplier, self.clipped_count_noise_std
        )

    @property
    def clipped_fraction_epsilon(self) -> Optional[float]:
        """Epsilon of the S noisy clipped counts alone (sigma_b), or None when off.

        Informative only: the run's guarantee is `epsilon`, which accounts the
        updates and the counts together.
        """
        if self.clipped_fraction_std is None:
            return None
        return accounting.compute_epsilon(
            self.clipped_count_noise_std,
            self.sampling_rate,
            self.steps,
            self.delta,
            self.accountant,
        )

    @property
    def eta(self) -> float:
        """Total Amount of Noise of the S planned updates."""
        return self.eta_after(self.steps)

    def eta_after(self, steps: int) -> float:
        """Total Amount of Noise after `steps` updates (inf without noise).

        With the accounted noise multiplier: eta describes privacy.
        """
        return tan.eta(self.accounted_noise_multiplier, self.sampling_rate, steps)

    @property
    def eps_tan(self) -> float:
        """The TAN estimate of epsilon (a planning tool, not a guarantee)."""
        return tan.eps_tan(self.eta, self.delta)

    @property
    def overcharged(self) -> bool:
        """Whether the accounted sigma is below `tan.OVERCHARGE_SIGMA` (epsilon >> eps_TAN)."""
        return self.accounted_noise_multiplier < tan.OVERCHARGE_SIGMA

    @property
    def gradient_evaluations(self) -> int:
        """Expected per-example gradient evaluations, S * B * K."""
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

    def run_privacy(self) -> planning.RunPrivacy:
        """This run's numbers in the form a simulation plan reports its runs."""
        return planning.RunPrivacy(
            batch_size=self.batch_size,
            noise_multiplier=self.noise_multiplier,
            sampling_rate=self.sampling_rate,
            steps=self.steps,
            eta=self.eta,
            eps_tan=self.eps_tan,
            epsilon=self.epsilon,
            overcharged=self.overcharged,
            private=self.private,
            gradient_evaluations=self.gradient_evaluations,
        )

    def runs_dict(self) -> Dict[str, Any]:
        """A simulation's two runs side by side, JSON-ready.

        Returns:
          {"simulation": this run, "reference": the private run (None outside
          simulation mode), dataset_size, delta, augmult, accountant,
          compute_saving}; each run as `planning.RunPrivacy.to_dict`.
        """
        return {
            "simulation": self.run_privacy().to_dict(),
            "reference": self.reference.to_dict() if self.reference else None,
            "dataset_size": self.dataset_size,
            "delta": self.delta,
            "augmult": self.augmult,
            "accountant": self.accountant,
            "compute_saving": self.compute_saving,
        }

    def to_dict(self) -> Dict[str, Any]:
        """The plan's numbers as a flat JSON-ready dict (inf -> None)."""
        ref = self.reference
        return json_safe(
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
                "reference_dataset_size": self.reference_dataset_size,
                "compute_saving": self.compute_saving,
                "clipped_fraction_std": self.clipped_fraction_std,
                "accounted_noise_multiplier": (
                    self.accounted_noise_multiplier
                    if self.clipped_fraction_std is not None
                    else None
                ),
                "clipped_fraction_epsilon": self.clipped_fraction_epsilon,
            }
        )


def make_plan(
    *,
    dataset_size: int,
    batch_size: int,
    steps: int,
    delta: float,
    augmult: int = 1,
    accountant: str = "rdp",
    target_eps: Optional[float] = None,
    noise_multiplier: Optional[float] = None,
    ref_batch_size: Optional[int] = None,
    ref_noise_multiplier: Optional[float] = None,
    noise_seeded: bool = False,
    reference_dataset_size: Optional[int] = None,
    clipped_fraction_std: Optional[float] = None,
) -> PrivacyPlan:
    """Fixes sigma for a run on N examples and computes what it will spend.

    Args:
      dataset_size: N, an integer >= 1.
      batch_size: B, an integer in [1, N] (in a simulation, <= ref_batch_size).
      steps: S, an integer >= 1.
      delta: Target delta in (0, 1).
      augmult: K >= 1 (compute only).
      accountant: "rdp" or "pld".
      target_eps: Epsilon to calibrate sigma for (never exceeded).
      noise_multiplier: sigma >= 0 (0: no noise, not private).
      ref_batch_size: B_ref of the private run to simulate.
      ref_noise_multiplier: sigma_ref of that run.
      noise_seeded: Whether noise and sampling are seeded (not private).
      reference_dataset_size: In a simulation, N of the private run when it
        differs from this run's (a simulation on a tuning split held out of
        the private set); None: the same N.
      clipped_fraction_std: None, or the std s > 0 of a noisy clipped
        fraction released at every step (noise s * B on the count). The
        run is accounted with sigma_eff = (sigma^-2 + (s B)^-2)^(-1/2). With
        `target_eps`, sigma_eff is calibrated and sigma = (sigma_eff^-2 -
        (s B)^-2)^(-1/2). In a simulation the reference releases its
        fraction with the same s (count noise s * B_ref).

    Returns:
      The `PrivacyPlan`.

    Raises:
      ValueError: naming the flag, on a bad value or combination (see
        `noise_mode`), when nothing sets the noise, when B or B_ref exceeds
        N, when the target epsilon cannot be met, or when
        `clipped_fraction_std` is too small for it (s * B must exceed the
        calibrated sigma_eff).
    """
    mode = noise_mode(
        target_eps=target_eps,
        noise_multiplier=noise_multiplier,
        ref_batch_size=ref_batch_size,
        ref_noise_multiplier=ref_noise_multiplier,
        batch_size=batch_size,
    )
    n = _validate.positive_int("dataset_size", dataset_size)
    ref_n = n if reference_dataset_size is None else reference_dataset_size
    for name, value, size in (
        ("batch_size", batch_size, n),
        ("ref_batch_size", ref_batch_size, ref_n),
    ):
        if value is not None:
            _validate.integer(
                name,
                value,
                low=1,
                high=size,
                hint=f"The dataset has N={size} training examples; q = B/N cannot exceed 1",
            )
    steps = _validate.positive_int("steps", steps)
    delta = _validate.delta("delta", delta)
    augmult = _validate.positive_int("augmult", augmult)
    accountant = _validate.one_of("accountant", accountant, accounting.ACCOUNTANTS)
    if clipped_fraction_std is not None:
        clipped_fraction_std = _validate.positive(
            "clipped_fraction_std",
            clipped_fraction_std,
            hint="The std of the released clipped fraction (e.g. 0.05), or None",
        )
    # sigma_b of this run's count (None: no count released).
    count_std = None if clipped_fraction_std is None else clipped_fraction_std * batch_size
    q = batch_size / n
    reference, target = None, None
    if mode == "simulation":
        simulated = planning.plan_simulation(
            ref_batch_size=ref_batch_size,
            ref_noise_multiplier=ref_noise_multiplier,
            steps=steps,
            dataset_size=n,
            delta=delta,
            batch_size=batch_size,
            augmult=augmult,
            accountant=accountant,
            reference_dataset_size=reference_dataset_size,
        )
        reference = simulated.reference
        sigma, epsilon = simulated.simulation.noise_multiplier, simulated.simulation.epsilon
        if clipped_fraction_std is not None:
            # planning accounts the gradient noise alone; both runs release
            # the fraction with the same std, so each count has noise s * B
            # of its own batch (sigma_eff / B stays equal: so does eta).
            reference = _with_noisy_count(
                reference, clipped_fraction_std * reference.batch_size, delta, accountant
            )
            epsilon = accounting.compute_epsilon(
                accounting.effective_noise_multiplier(sigma, count_std),
                q,
                steps,
                delta,
                accountant,
            )
    elif mode == "noise_multiplier":
        sigma = _validate.non_negative("noise_multiplier", noise_multiplier)
        epsilon = accounting.compute_epsilon(
            accounting.effective_noise_multiplier(sigma, count_std), q, steps, delta, accountant
        )
    else:
        if target_eps is None:
            raise _validate.invalid(
                "target_eps",
                "a value, or --noise_multiplier, or --ref_batch_size with "
                "--ref_noise_multiplier (something must set the noise)",
                None,
            )
        target = _validate.positive("target_eps", target_eps)
        try:
            # With a noisy count this is sigma_eff, which the target fixes.
            sigma = accounting.calibrate_noise_multiplier(target, q, steps, delta, accountant)
        except ValueError as err:
            # The library names its argument `target_epsilon`; the user typed
            # --target_eps, and the message must name what they typed.
            raise ValueError(str(err).replace("target_epsilon", "target_eps")) from None
        if count_std is not None:
            sigma = _gradient_sigma_for(sigma, count_std, clipped_fraction_std, batch_size, target)
        epsilon = accounting.compute_epsilon(
            accounting.effective_noise_multiplier(sigma, count_std), q, steps, delta, accountant
        )
    return PrivacyPlan(
        mode=mode,
        dataset_size=n,
        batch_size=batch_size,
        noise_multiplier=sigma,
        steps=steps,
        augmult=augmult,
        delta=delta,
        accountant=accountant,
        epsilon=epsilon,
        target_epsilon=target,
        noise_seeded=noise_seeded,
        reference=reference,
        warnings=tuple(_warnings(n, delta)),
        reference_dataset_size=ref_n if reference is not None else None,
        clipped_fraction_std=clipped_fraction_std,
    )


def _gradient_sigma_for(
    effective: float, count_std: float, clipped_fraction_std: float, batch_size: int, target: float
) -> float:
    """The gradient's sigma that, with the count's noise `count_std`, accounts as `effective`."""
    # The second test catches a gap lost to round-off (no finite sigma).
    if count_std <= effective or effective**-2 <= count_std**-2:
        raise _validate.invalid(
            "clipped_fraction_std",
            f"a float > {effective / batch_size:.10g} with target_eps={target:g} and "
            f"batch_size={batch_size} (the count's noise clipped_fraction_std * batch_size "
            f"must exceed the effective noise multiplier {effective:.6g} that the target "
            "needs: the count alone would spend the whole budget)",
            clipped_fraction_std,
        )
    sigma = accounting.gradient_noise_multiplier(effective, count_std)
    # Round-off: sigma_eff recomputed from sigma may come out an ulp below
    # the calibrated one, and its epsilon an ulp above the target. More
    # gradient noise only lowers epsilon.
    while accounting.effective_noise_multiplier(sigma, count_std) < effective:
        sigma *= 1.0 + 1e-12
    return sigma


def _with_noisy_count(
    run: planning.RunPrivacy, count_std: float, delta: float, accountant: str
) -> planning.RunPrivacy:
    """`run`'s privacy numbers when it also releases a count with noise `count_std`."""
    sigma = accounting.effective_noise_multiplier(run.noise_multiplier, count_std)
    total = tan.eta(sigma, run.sampling_rate, run.steps)
    overcharged = sigma < tan.OVERCHARGE_SIGMA
    return dataclasses.replace(
        run,
        eta=total,
        eps_tan=tan.eps_tan(total, delta),
        epsilon=accounting.compute_epsilon(sigma, run.sampling_rate, run.steps, delta, accountant),
        overcharged=overcharged,
        private=run.private and not overcharged,
    )


def _warnings(n: int, delta: float) -> List[str]:
    # An overcharged run is not warned about here: every report of a plan
    # explains it (`overcharge.OverchargeReport.message`, the program's plan).
    notes = []
    if delta >= 1.0 / n:
        notes.append(
            f"delta={delta:g} is not below 1/N = 1/dataset_size = {1.0 / n:.3g}; the usual "
            "rule is delta << 1/N (releasing one random example in the clear has delta = 1/N)."
        )
    return notes
