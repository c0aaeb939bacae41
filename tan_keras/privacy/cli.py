"""The work behind `python -m tan_keras.privacy`: pure functions, plain values.

`report` answers one of three questions and returns a JSON-ready dict:
  * "epsilon": the privacy of a run (B, sigma, S) on N examples at delta;
  * "calibrate": the noise multiplier that meets --target_eps for (B, S);
  * "plan": a cheap simulation (batch_size) of a private reference run
    (ref_batch_size, ref_noise_multiplier) at the same S and sigma/B.
`format_report` renders it for a person and `to_json` for a program. Bad
input raises ValueError naming the flag, the allowed range and the value.

In a plan, the top-level run keys (batch_size, noise_multiplier, epsilon, ...)
describe the reference run, the one whose epsilon can be claimed; the
`simulation` object is the run to launch now.
"""

import json
import math
from typing import Any, Dict, Optional

from tan_keras import _validate
from tan_keras.privacy import accounting, planning, tan


def parse_number(text: Optional[str]) -> Any:
    """A flag's text as an int or float; anything else is returned unchanged.

    Non-numbers are passed through so that the validators, which know each
    flag's range, reject them with the package's standard message.

    Args:
      text: The flag's value as typed, or None when the flag was not given.

    Returns:
      int, float, None, or `text` itself when it is not a number.
    """
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def report(
    *,
    dataset_size: Any,
    batch_size: Any,
    delta: Any,
    noise_multiplier: Any = None,
    steps: Any = None,
    epochs: Any = None,
    target_eps: Any = None,
    ref_batch_size: Any = None,
    ref_noise_multiplier: Any = None,
    augmult: Any = 1,
    accountant: Any = "rdp",
) -> Dict[str, Any]:
    """Answers one privacy question; arguments are named after the CLI flags.

    Args:
      dataset_size: N, distinct training examples; required.
      batch_size: Expected batch size B (in a plan: the simulation's); required.
      delta: Target delta in (0, 1); required (no safe default: it must be
        well below 1/N, e.g. 1e-5 for CIFAR-10, 8e-7 for ImageNet).
      noise_multiplier: sigma > 0; or give target_eps, or a plan's ref flags.
      steps: Noisy updates S >= 1; or give epochs.
      epochs: Passes over the data, converted to ceil(epochs * N / B) steps
        (in a plan, with B = ref_batch_size).
      target_eps: Solve for the noise multiplier meeting this epsilon.
      ref_batch_size: B_ref of the private run a plan simulates.
      ref_noise_multiplier: sigma_ref of the private run a plan simulates.
      augmult: Augmentation multiplicity K >= 1 (only changes compute).
      accountant: "rdp" or "pld".

    Returns:
      A JSON-ready dict (non-finite floats are None), with at least: mode,
      epsilon, eta, eps_tan, noise_multiplier, sampling_rate, steps, delta,
      overcharged, message, warnings; a plan adds `simulation`, `reference`
      and `compute_saving`.

    Raises:
      ValueError: on any missing, conflicting or out-of-range argument, or an
        unreachable target_eps.
    """
    n = _validate.positive_int(
        "dataset_size", dataset_size, hint=_required("dataset_size", dataset_size)
    )
    delta = _validate.real(
        "delta",
        delta,
        low=0.0,
        high=1.0,
        low_inclusive=False,
        high_inclusive=False,
        hint=_required(
            "delta",
            delta,
            "(no safe default: use delta well below 1/dataset_size, e.g. 1e-5 "
            "for CIFAR-10 and 8e-7 for ImageNet)",
        ),
    )
    augmult = _validate.positive_int("augmult", augmult)
    accountant = _validate.one_of("accountant", accountant, accounting.ACCOUNTANTS)
    is_plan = ref_batch_size is not None or ref_noise_multiplier is not None
    if is_plan:
        if ref_batch_size is None or ref_noise_multiplier is None:
            missing = "ref_batch_size" if ref_batch_size is None else "ref_noise_multiplier"
            given = "ref_noise_multiplier" if ref_batch_size is None else "ref_batch_size"
            raise _validate.invalid(
                missing,
                f"a value, since --{given} is given (a plan needs both)",
                None,
            )
        for name, value in (("noise_multiplier", noise_multiplier), ("target_eps", target_eps)):
            if value is not None:
                raise _validate.invalid(
                    name,
                    "unset in a simulation plan (the simulation's noise multiplier "
                    "is ref_noise_multiplier * batch_size / ref_batch_size)",
                    value,
                )
        ref_batch_size = _validate.integer("ref_batch_size", ref_batch_size, low=1, high=n)
    batch_size = _validate.positive_int(
        "batch_size", batch_size, hint=_required("batch_size", batch_size)
    )
    steps = _steps(steps, epochs, ref_batch_size if is_plan else batch_size, n)

    warnings = []
    if delta >= 1.0 / n:
        warnings.append(
            f"delta={delta:g} is not below 1/dataset_size={1.0 / n:.3g}; the "
            "usual rule is delta << 1/N, since releasing one random training "
            "example in the clear already has delta = 1/N."
        )

    if is_plan:
        plan = planning.plan_simulation(
            ref_batch_size=ref_batch_size,
            ref_noise_multiplier=ref_noise_multiplier,
            steps=steps,
            dataset_size=n,
            delta=delta,
            batch_size=batch_size,
            augmult=augmult,
            accountant=accountant,
        )
        return _plan_report(plan, warnings)

    q = accounting.sampling_rate(batch_size, n)
    if target_eps is not None:
        if noise_multiplier is not None:
            raise _validate.invalid(
                "target_eps",
                "unset when --noise_multiplier is given (give one of them)",
                target_eps,
            )
        target = _validate.positive("target_eps", target_eps)
        try:
            sigma = accounting.calibrate_noise_multiplier(target, q, steps, delta, accountant)
        except ValueError as err:
            # The library names its argument `target_epsilon`; the user typed
            # --target_eps, and the message must name what they typed.
            raise ValueError(str(err).replace("target_epsilon", "target_eps")) from None
        mode = "calibrate"
    else:
        sigma = _validate.positive(
            "noise_multiplier",
            noise_multiplier,
            hint=_required(
                "noise_multiplier",
                noise_multiplier,
                "(or give --target_eps to solve for it); 0 means no noise and no privacy",
            ),
        )
        mode = "epsilon"
    check = tan.check_overcharge(sigma, q, steps, delta, accountant)
    result = {
        "mode": mode,
        "accountant": accountant,
        "dataset_size": n,
        "delta": delta,
        **_run_keys(check, batch_size, n, augmult),
        "message": check.message,
        "warnings": warnings,
    }
    if mode == "calibrate":
        result["target_epsilon"] = target
    return _json_safe(result)


def format_report(result: Dict[str, Any]) -> str:
    """A short human-readable rendering of `report`'s dict.

    Args:
      result: The dict returned by `report`.

    Returns:
      Multi-line text, without a trailing newline.
    """
    if result["mode"] == "plan":
        return _format_plan(result)
    lines = [f"DP-SGD with Poisson sampling, {result['accountant']} accountant"]
    if result["mode"] == "calibrate":
        lines.append(
            f"  calibrated noise_multiplier {_num(result['noise_multiplier'])} "
            f"for target_eps {_num(result['target_epsilon'])}"
        )
    lines += [
        f"  dataset_size N     {result['dataset_size']}",
        f"  batch_size B       {result['batch_size']}  (q = {_num(result['sampling_rate'])})",
        f"  noise_multiplier   {_num(result['noise_multiplier'])}  "
        f"(sigma/B = {_num(result['sigma_over_batch_size'])})",
        f"  steps S            {result['steps']}  ({_num(result['epochs'])} epochs)",
        f"  delta              {result['delta']:g}",
        f"  epsilon            {_eps(result['epsilon'])}",
        f"  eta (TAN)          {_num(result['eta'])}",
        f"  eps_TAN            {_eps(result['eps_tan'])}",
        "",
        result["message"],
    ]
    lines += [f"Warning: {w}" for w in result["warnings"]]
    return "\n".join(lines)


def to_json(result: Dict[str, Any]) -> str:
    """`report`'s dict as one line of strict JSON (never NaN or Infinity).

    Args:
      result: The dict returned by `report`.

    Returns:
      A JSON object on one line.

    Raises:
      ValueError: if a non-finite float slipped through (a bug).
    """
    return json.dumps(_json_safe(result), allow_nan=False)


def _steps(steps: Any, epochs: Any, batch_size: int, n: int) -> int:
    if steps is not None and epochs is not None:
        raise _validate.invalid("epochs", "unset when --steps is given (give one of them)", epochs)
    if epochs is not None:
        return accounting.epochs_to_steps(epochs, batch_size, n)
    return _validate.positive_int(
        "steps", steps, hint=_required("steps", steps, "(or give --epochs)")
    )


def _run_keys(check: tan.OverchargeReport, batch_size: int, n: int, augmult: int):
    return {
        "batch_size": batch_size,
        "noise_multiplier": check.noise_multiplier,
        "sampling_rate": check.sampling_rate,
        "sigma_over_batch_size": check.noise_multiplier / batch_size,
        "steps": check.steps,
        "epochs": check.steps * batch_size / n,
        "augmult": augmult,
        "gradient_evaluations": check.steps * batch_size * augmult,
        "epsilon": check.epsilon,
        "eta": check.eta,
        "eps_tan": check.eps_tan,
        "ratio": check.ratio,
        "overcharged": check.overcharged,
    }


def _plan_report(plan: planning.SimulationPlan, warnings) -> Dict[str, Any]:
    ref, sim = plan.reference, plan.simulation
    ref_check = _overcharge(ref, plan.delta)
    message = (
        f"The simulation (batch_size={sim.batch_size}, noise_multiplier="
        f"{sim.noise_multiplier:g}, steps={sim.steps}) is NOT private: it has "
        "the reference run's eta (same steps and sigma/B), so it trains alike "
        "at a fraction of the cost; use it to tune every non-privacy "
        "hyper-parameter (learning rate, momentum, EMA, augmentations, "
        "architecture) and keep them unchanged in the reference run. Its "
        f"epsilon ({_eps(sim.epsilon)}) is not a guarantee to claim"
        + (
            f": with noise_multiplier < {tan.OVERCHARGE_SIGMA:g} it is "
            f"overcharged, {_eps(sim.epsilon)} vs eps_TAN {_eps(sim.eps_tan)}."
            if sim.overcharged
            else "."
        )
        + f" Only the reference run (batch_size={ref.batch_size}, "
        f"noise_multiplier={ref.noise_multiplier:g}, steps={ref.steps}) gives "
        f"the privacy guarantee epsilon={_eps(ref.epsilon)} at "
        f"delta={plan.delta:g}."
    )
    if ref.overcharged:
        message += " The reference run itself is overcharged: " + ref_check.message
    result = {
        "mode": "plan",
        "accountant": plan.accountant,
        "dataset_size": plan.dataset_size,
        "delta": plan.delta,
        **_run_keys(ref_check, ref.batch_size, plan.dataset_size, plan.augmult),
        "private": ref.private,
        "compute_saving": plan.compute_saving,
        "simulation": sim.to_dict(),
        "reference": ref.to_dict(),
        "message": message,
        "warnings": warnings,
    }
    return _json_safe(result)


def _overcharge(run: planning.RunPrivacy, delta: float) -> tan.OverchargeReport:
    # Built from the plan's numbers rather than by check_overcharge, which
    # would run the accountant a second time.
    return tan.OverchargeReport(
        noise_multiplier=run.noise_multiplier,
        sampling_rate=run.sampling_rate,
        steps=run.steps,
        delta=delta,
        epsilon=run.epsilon,
        eps_tan=run.eps_tan,
        eta=run.eta,
        ratio=run.epsilon / run.eps_tan,
        overcharged=run.overcharged,
    )


def _format_plan(result: Dict[str, Any]) -> str:
    ref, sim = result["reference"], result["simulation"]
    header = (
        f"TAN simulation plan ({result['accountant']} accountant, "
        f"delta={result['delta']:g}, N={result['dataset_size']}, "
        f"S={result['steps']} steps, K={result['augmult']})"
    )
    row = "{:<11} {:>10} {:>16} {:>10} {:>8} {:>8} {:>12}  {}"
    lines = [
        header,
        "",
        row.format("run", "batch_size", "noise_multiplier", "q", "eta", "eps_TAN", "epsilon", ""),
    ]
    for name, run in (("reference", ref), ("simulation", sim)):
        verdict = "private" if run["private"] else "NOT PRIVATE"
        lines.append(
            row.format(
                name,
                run["batch_size"],
                _num(run["noise_multiplier"]),
                _num(run["sampling_rate"]),
                _num(run["eta"]),
                _eps(run["eps_tan"]),
                _eps(run["epsilon"]),
                verdict,
            )
        )
    lines += [
        "",
        f"Compute saving: {_num(result['compute_saving'])}x per run "
        f"(ref_batch_size/batch_size = {ref['batch_size']}/{sim['batch_size']}; "
        f"{sim['gradient_evaluations']:.3g} vs {ref['gradient_evaluations']:.3g} "
        "gradient evaluations).",
        f"Launch now: batch_size={sim['batch_size']}, noise_multiplier="
        f"{_num(sim['noise_multiplier'])}, steps={sim['steps']}.",
        "",
        result["message"],
    ]
    lines += [f"Warning: {w}" for w in result["warnings"]]
    return "\n".join(lines)


def _required(name: str, value: Any, extra: str = "") -> str:
    if value is not None:
        return ""
    return f"--{name} is required {extra}".strip()


def _json_safe(value: Any) -> Any:
    """Replaces non-finite floats by None, recursively (JSON has no Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def _num(value: Optional[float]) -> str:
    return "inf" if value is None else f"{value:.4g}"


def _eps(value: Optional[float]) -> str:
    # Two decimals match how epsilons are quoted (7.10); small ones keep
    # three significant digits rather than rounding to 0.00.
    if value is None:
        return "inf"
    return f"{value:.2f}" if value >= 1 else f"{value:.3g}"
