"""Planning cheap simulations of a private run with the TAN scaling law.

At a fixed number of steps S and a fixed ratio sigma/B, every batch size B
gives the same Total Amount of Noise eta, and training behaves alike (test
accuracy is log-linear in B; hyper-parameter rankings are preserved). So a
large private run (B_ref, sigma_ref, S) can be simulated by a small one
(B, sigma_ref * B / B_ref, S), B_ref / B times cheaper, to tune every
non-privacy hyper-parameter. The small run has sigma < 2 and is NOT private;
only the reference run's epsilon may be claimed, and only once it is trained.

`step_search` explores the other axis: at fixed eta and sigma, B ~ 1/sqrt(S)
and the learning rate keeps lr * S constant (the paper's ImageNet search:
(B, S, lr) = (32768, 18000, 32) vs (16384, 72000, 8)).
"""

import dataclasses
import math
from typing import Any, Dict, Iterable, List, Optional

from tan_keras import _numbers, _validate
from tan_keras.privacy import accounting, tan


@dataclasses.dataclass(frozen=True)
class RunPrivacy:
    """The privacy side of one DP-SGD run.

    Attributes:
      batch_size: Expected batch size B.
      noise_multiplier: sigma.
      sampling_rate: q = B / N.
      steps: Number of noisy updates S.
      eta: Total Amount of Noise.
      eps_tan: The TAN estimate of epsilon.
      epsilon: Exact epsilon from the accountant.
      overcharged: True when sigma < `tan.OVERCHARGE_SIGMA`.
      private: True for a run whose epsilon is the guarantee to claim: a
        reference run that is not overcharged. A simulation is never private:
        it is a tuning run on the private data whose epsilon is shown only to
        make that plain.
      gradient_evaluations: Expected per-example gradient evaluations of the
        whole run, S * B * K (K: augmentation multiplicity).
    """

    batch_size: int
    noise_multiplier: float
    sampling_rate: float
    steps: int
    eta: float
    eps_tan: float
    epsilon: float
    overcharged: bool
    private: bool
    gradient_evaluations: int

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict; a non-finite epsilon becomes None."""
        return {
            field.name: _numbers.json_safe(getattr(self, field.name))
            for field in dataclasses.fields(self)
        }


@dataclasses.dataclass(frozen=True)
class SimulationPlan:
    """A small non-private run that simulates a large private one.

    Attributes:
      simulation: The cheap run to launch now (same S and sigma/B, smaller B).
      reference: The private run it simulates.
      dataset_size: N.
      delta: Target delta of both epsilons.
      augmult: Augmentation multiplicity K (affects only compute).
      accountant: "rdp" or "pld".
    """

    simulation: RunPrivacy
    reference: RunPrivacy
    dataset_size: int
    delta: float
    augmult: int
    accountant: str

    @property
    def compute_saving(self) -> float:
        """How many times cheaper the simulation is: B_ref / B."""
        return self.reference.batch_size / self.simulation.batch_size

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict (no Infinity: non-finite floats become None)."""
        return {
            "simulation": self.simulation.to_dict(),
            "reference": self.reference.to_dict(),
            "dataset_size": self.dataset_size,
            "delta": self.delta,
            "augmult": self.augmult,
            "accountant": self.accountant,
            "compute_saving": self.compute_saving,
        }


def plan_simulation(
    ref_batch_size: int,
    ref_noise_multiplier: float,
    steps: int,
    dataset_size: int,
    delta: float,
    batch_size: int,
    augmult: int = 1,
    accountant: str = "rdp",
    reference_dataset_size: Optional[int] = None,
) -> SimulationPlan:
    """Plans a batch-size-B simulation of the private run (B_ref, sigma_ref, S).

    The simulation keeps S and sigma/B: sigma_sim = sigma_ref * B / B_ref, so
    its eta equals the reference's. Keep every other hyper-parameter (learning
    rate, momentum, EMA, K, architecture) identical.

    Args:
      ref_batch_size: B_ref, an integer in [1, dataset_size].
      ref_noise_multiplier: sigma_ref, a float > 0.
      steps: S, an integer >= 1, shared by both runs.
      dataset_size: N, an integer >= 1.
      delta: Target delta, a float in (0, 1).
      batch_size: B of the simulation, an integer in [1, ref_batch_size].
      augmult: K, an integer >= 1; only changes gradient_evaluations.
      accountant: "rdp" or "pld".
      reference_dataset_size: N of the private run when the simulation
        trains on other examples (a tuning split held out of the private
        set, of `dataset_size` examples); None: the same N. Both runs keep S
        and sigma/B; their eta are then equal only if the N are.

    Returns:
      A `SimulationPlan` (its `dataset_size` is the simulation's N).

    Raises:
      ValueError: if an argument is out of range, in particular when
        batch_size > ref_batch_size.
    """
    n = _validate.positive_int("dataset_size", dataset_size)
    ref_n = (
        n
        if reference_dataset_size is None
        else _validate.positive_int("reference_dataset_size", reference_dataset_size)
    )
    ref_batch_size = _validate.integer(
        "ref_batch_size",
        ref_batch_size,
        low=1,
        high=ref_n,
        hint=f"The private run has N={ref_n} training examples; q = B/N cannot exceed 1",
    )
    ref_sigma = _validate.positive("ref_noise_multiplier", ref_noise_multiplier)
    steps = _validate.positive_int("steps", steps)
    delta = _validate.delta("delta", delta)
    batch_size = _validate.integer(
        "batch_size",
        batch_size,
        low=1,
        high=ref_batch_size,
        hint="A simulation uses a smaller batch than the run it simulates (ref_batch_size)",
    )
    _validate.integer(
        "batch_size",
        batch_size,
        low=1,
        high=n,
        hint=f"The simulation trains on N={n} examples; q = B/N cannot exceed 1",
    )
    augmult = _validate.positive_int("augmult", augmult)
    accountant = _validate.one_of("accountant", accountant, accounting.ACCOUNTANTS)

    def run(b: int, sigma: float, size: int, is_reference: bool) -> RunPrivacy:
        return _run_privacy(b, sigma, steps, size, delta, augmult, accountant, is_reference)

    return SimulationPlan(
        simulation=run(batch_size, ref_sigma * batch_size / ref_batch_size, n, False),
        reference=run(ref_batch_size, ref_sigma, ref_n, True),
        dataset_size=n,
        delta=delta,
        augmult=augmult,
        accountant=accountant,
    )


@dataclasses.dataclass(frozen=True)
class StepSearchPoint:
    """One candidate (S, B, lr) at the reference's eta and sigma.

    Attributes:
      steps: S.
      batch_size: B = round(B_ref * sqrt(S_ref / S)).
      learning_rate: lr_ref * S_ref / S (keeps lr * S constant).
      noise_multiplier: sigma (shared by all points).
      sampling_rate: q = B / N.
      eta: Total Amount of Noise (equal to the reference's up to rounding B).
      eps_tan: The TAN estimate of epsilon.
      epsilon: Exact epsilon from the accountant.
      overcharged: True when sigma < `tan.OVERCHARGE_SIGMA`.
    """

    steps: int
    batch_size: int
    learning_rate: float
    noise_multiplier: float
    sampling_rate: float
    eta: float
    eps_tan: float
    epsilon: float
    overcharged: bool

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict; a non-finite epsilon becomes None."""
        return {
            field.name: _numbers.json_safe(getattr(self, field.name))
            for field in dataclasses.fields(self)
        }


def step_search(
    noise_multiplier: float,
    ref_batch_size: int,
    ref_steps: int,
    ref_learning_rate: float,
    dataset_size: int,
    delta: float,
    steps_grid: Iterable[int],
    accountant: str = "rdp",
) -> List[StepSearchPoint]:
    """Candidate step counts at fixed eta and sigma (B ~ 1/sqrt(S), lr*S fixed).

    Args:
      noise_multiplier: sigma shared by every point, a float > 0.
      ref_batch_size: B_ref, an integer in [1, dataset_size].
      ref_steps: S_ref, an integer >= 1.
      ref_learning_rate: lr_ref, a float > 0.
      dataset_size: N, an integer >= 1.
      delta: Target delta, a float in (0, 1).
      steps_grid: Step counts to evaluate, a non-empty iterable of integers
        >= 1, each giving a batch size in [1, dataset_size].
      accountant: "rdp" or "pld".

    Returns:
      One `StepSearchPoint` per entry of `steps_grid`, in order.

    Raises:
      ValueError: if an argument is out of range, if `steps_grid` is empty, or
        if a step count needs a batch size outside [1, dataset_size].
    """
    sigma = _validate.positive("noise_multiplier", noise_multiplier)
    n = _validate.positive_int("dataset_size", dataset_size)
    ref_batch_size = _validate.integer("ref_batch_size", ref_batch_size, low=1, high=n)
    ref_steps = _validate.positive_int("ref_steps", ref_steps)
    ref_lr = _validate.positive("ref_learning_rate", ref_learning_rate)
    delta = _validate.delta("delta", delta)
    accountant = _validate.one_of("accountant", accountant, accounting.ACCOUNTANTS)
    grid = list(steps_grid) if _is_iterable(steps_grid) else None
    if not grid:
        raise _validate.invalid("steps_grid", "a non-empty list of integers >= 1", steps_grid)

    points = []
    for raw in grid:
        steps = _validate.positive_int("steps_grid", raw)
        batch_size = round(ref_batch_size * math.sqrt(ref_steps / steps))
        if not 1 <= batch_size <= n:
            raise _validate.invalid(
                "steps_grid",
                f"step counts whose batch size ref_batch_size * sqrt(ref_steps / "
                f"steps) rounds into [1, {n}] (here {batch_size})",
                raw,
            )
        q = batch_size / n
        total = tan.eta(sigma, q, steps)
        points.append(
            StepSearchPoint(
                steps=steps,
                batch_size=batch_size,
                learning_rate=ref_lr * ref_steps / steps,
                noise_multiplier=sigma,
                sampling_rate=q,
                eta=total,
                eps_tan=tan.eps_tan(total, delta),
                epsilon=accounting.compute_epsilon(sigma, q, steps, delta, accountant),
                overcharged=sigma < tan.OVERCHARGE_SIGMA,
            )
        )
    return points


def _run_privacy(
    batch_size: int,
    sigma: float,
    steps: int,
    dataset_size: int,
    delta: float,
    augmult: int,
    accountant: str,
    is_reference: bool,
) -> RunPrivacy:
    q = batch_size / dataset_size
    total = tan.eta(sigma, q, steps)
    overcharged = sigma < tan.OVERCHARGE_SIGMA
    return RunPrivacy(
        batch_size=batch_size,
        noise_multiplier=sigma,
        sampling_rate=q,
        steps=steps,
        eta=total,
        eps_tan=tan.eps_tan(total, delta),
        epsilon=accounting.compute_epsilon(sigma, q, steps, delta, accountant),
        overcharged=overcharged,
        private=is_reference and not overcharged,
        gradient_evaluations=steps * batch_size * augmult,
    )


def _is_iterable(value: Any) -> bool:
    if isinstance(value, (str, bytes)):
        return False
    try:
        iter(value)
    except TypeError:
        return False
    return True
