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
from typing import Any, Dict, List, Optional

from tan_keras import _validate
from tan_keras._numbers import json_safe, short
from tan_keras.privacy import accounting, overcharge, plan, planning, tan


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
    clipped_fraction_std: Any = None,
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
      clipped_fraction_std: The std s of a noisy clipped fraction the run
        also releases (count noise s * B): epsilon accounts both with
        sigma_eff (`tan_keras.privacy.plan.make_plan`). None: none released.

    Returns:
      A JSON-ready dict (non-finite floats are None), with at least: mode,
      epsilon, eta, eps_tan, noise_multiplier, sampling_rate, steps, delta,
      overcharged, message, warnings, clipped_fraction_std,
      accounted_noise_multiplier and clipped_fraction_epsilon (None without a
      noisy clipped fraction); a plan adds `simulation`, `reference` and
      `compute_saving`.

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
    mode = plan.noise_mode(
        target_eps=target_eps,
        noise_multiplier=noise_multiplier,
        ref_batch_size=ref_batch_size,
        ref_noise_multiplier=ref_noise_multiplier,
    )
    if mode == "simulation":
        ref_batch_size = _validate.integer("ref_batch_size", ref_batch_size, low=1, high=n)
    batch_size = _validate.positive_int(
        "batch_size", batch_size, hint=_required("batch_size", batch_size)
    )
    steps = _steps(steps, epochs, ref_batch_size if mode == "simulation" else batch_size, n)
    if mode != "simulation" and target_eps is None:
        # This command has no default target, and sigma = 0 is no question to ask.
        noise_multiplier = _validate.positive(
            "noise_multiplier",
            noise_multiplier,
            hint=_required(
                "noise_multiplier",
                noise_multiplier,
                "(or give --target_eps to solve for it); 0 means no noise and no privacy",
            ),
        )
    the_plan = plan.make_plan(
        dataset_size=n,
        batch_size=batch_size,
        steps=steps,
        delta=delta,
        augmult=augmult,
        accountant=accountant,
        target_eps=target_eps,
        noise_multiplier=noise_multiplier,
        ref_batch_size=ref_batch_size,
        ref_noise_multiplier=ref_noise_multiplier,
        clipped_fraction_std=clipped_fraction_std,
    )
    if the_plan.simulation:
        return _plan_report(the_plan)
    run = the_plan.run_privacy()
    check = _overcharge(run, delta)
    result = {
        "mode": "calibrate" if mode == "target_eps" else "epsilon",
        "accountant": accountant,
        "dataset_size": n,
        "delta": delta,
        **_run_keys(check, batch_size, n, augmult),
        "message": check.message,
        "warnings": list(the_plan.warnings),
        **_clipped_fraction_keys(the_plan),
    }
    if mode == "target_eps":
        result["target_epsilon"] = the_plan.target_epsilon
    return json_safe(result)


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
            f"  calibrated noise_multiplier {short(result['noise_multiplier'])} "
            f"for target_eps {short(result['target_epsilon'])}"
        )
    lines += [
        f"  dataset_size N     {result['dataset_size']}",
        f"  batch_size B       {result['batch_size']}  (q = {short(result['sampling_rate'])})",
        f"  noise_multiplier   {short(result['noise_multiplier'])}  "
        f"(sigma/B = {short(result['sigma_over_batch_size'])})",
        f"  steps S            {result['steps']}  ({short(result['epochs'])} epochs)",
        f"  delta              {result['delta']:g}",
        f"  epsilon            {_eps(result['epsilon'])}",
        f"  eta (TAN)          {short(result['eta'])}",
        f"  eps_TAN            {_eps(result['eps_tan'])}",
        *_clipped_fraction_lines(result),
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
    return json.dumps(json_safe(result), allow_nan=False)


def _steps(steps: Any, epochs: Any, batch_size: int, n: int) -> int:
    if steps is not None and epochs is not None:
        raise _validate.invalid("epochs", "unset when --steps is given (give one of them)", epochs)
    if epochs is not None:
        return accounting.epochs_to_steps(epochs, batch_size, n)
    return _validate.positive_int(
        "steps", steps, hint=_required("steps", steps, "(or give --epochs)")
    )


def _run_keys(check: overcharge.OverchargeReport, batch_size: int, n: int, augmult: int):
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


def _plan_report(the_plan: plan.PrivacyPlan) -> Dict[str, Any]:
    ref, sim = the_plan.reference, the_plan.run_privacy()
    runs = the_plan.runs_dict()
    ref_check = _overcharge(ref, the_plan.delta)
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
        f"delta={the_plan.delta:g}."
    )
    if ref.overcharged:
        message += " The reference run itself is overcharged: " + ref_check.message
    result = {
        "mode": "plan",
        "accountant": the_plan.accountant,
        "dataset_size": the_plan.dataset_size,
        "delta": the_plan.delta,
        **_run_keys(ref_check, ref.batch_size, the_plan.dataset_size, the_plan.augmult),
        "private": ref.private,
        "compute_saving": the_plan.compute_saving,
        "simulation": runs["simulation"],
        "reference": runs["reference"],
        "message": message,
        "warnings": list(the_plan.warnings),
        **_clipped_fraction_keys(the_plan, ref),
    }
    return json_safe(result)


def _clipped_fraction_keys(
    the_plan: plan.PrivacyPlan, run: Optional[planning.RunPrivacy] = None
) -> Dict[str, Any]:
    """The noisy clipped fraction's numbers of `run` (default: the plan's own run).

    In a simulation plan the report's run is the reference: its count has
    noise clipped_fraction_std * B_ref.
    """
    std = the_plan.clipped_fraction_std
    if std is None:
        return dict.fromkeys(
            ("clipped_fraction_std", "accounted_noise_multiplier", "clipped_fraction_epsilon")
        )
    run = run or the_plan.run_privacy()
    count_sigma = std * run.batch_size
    return {
        "clipped_fraction_std": std,
        "accounted_noise_multiplier": accounting.effective_noise_multiplier(
            run.noise_multiplier, count_sigma
        ),
        "clipped_fraction_epsilon": accounting.compute_epsilon(
            count_sigma, run.sampling_rate, run.steps, the_plan.delta, the_plan.accountant
        ),
    }


def _overcharge(run: planning.RunPrivacy, delta: float) -> overcharge.OverchargeReport:
    # Built from the plan's numbers rather than by check_overcharge, which
    # would run the accountant a second time.
    return overcharge.OverchargeReport(
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


def _clipped_fraction_lines(result: Dict[str, Any]) -> List[str]:
    if result.get("clipped_fraction_std") is None:
        return []
    return [
        f"  clipped fraction   released with noise std {result['clipped_fraction_std']:g} "
        f"(alone: epsilon {_eps(result['clipped_fraction_epsilon'])}); epsilon above "
        f"accounts both with sigma_eff {short(result['accounted_noise_multiplier'])}",
    ]


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
                short(run["noise_multiplier"]),
                short(run["sampling_rate"]),
                short(run["eta"]),
                _eps(run["eps_tan"]),
                _eps(run["epsilon"]),
                verdict,
            )
        )
    lines += [
        "",
        f"Compute saving: {short(result['compute_saving'])}x per run "
        f"(ref_batch_size/batch_size = {ref['batch_size']}/{sim['batch_size']}; "
        f"{sim['gradient_evaluations']:.3g} vs {ref['gradient_evaluations']:.3g} "
        "gradient evaluations).",
        f"Launch now: batch_size={sim['batch_size']}, noise_multiplier="
        f"{short(sim['noise_multiplier'])}, steps={sim['steps']}.",
        *(f"Reference run: {line.strip()}" for line in _clipped_fraction_lines(result)),
        "",
        result["message"],
    ]
    lines += [f"Warning: {w}" for w in result["warnings"]]
    return "\n".join(lines)


def _required(name: str, value: Any, extra: str = "") -> str:
    if value is not None:
        return ""
    return f"--{name} is required {extra}".strip()


def _eps(value: Optional[float]) -> str:
    # Two decimals match how epsilons are quoted (7.10); small ones keep
    # three significant digits rather than rounding to 0.00.
    if value is None:
        return "inf"
    return f"{value:.2f}" if value >= 1 else f"{value:.3g}"
