"""The training program's privacy plan, computed and printed before training.

`plan_privacy` applies the one planning rule (`tan_keras.privacy.plan`) to a
run's settings and N; `format_plan` prints it for the person who launched
the run (with a NOT PRIVATE mark for simulations and seeded runs).
"""

from typing import Optional, Sequence

from tan_keras._numbers import short
from tan_keras.privacy import tan
from tan_keras.privacy.plan import PrivacyPlan, make_plan
from tan_keras.training.train_config import TrainConfig


def plan_privacy(
    config: TrainConfig, dataset_size: int, reference_dataset_size: Optional[int] = None
) -> PrivacyPlan:
    """Fixes sigma for `config` on N examples and computes the run's privacy.

    Args:
      config: The validated run settings.
      dataset_size: N, the number of distinct training examples.
      reference_dataset_size: A simulation's private run's N where it differs
        from this run's (`training_set.reference_dataset_size`).

    Returns:
      The `PrivacyPlan` (`tan_keras.privacy.plan.make_plan`).

    Raises:
      ValueError: naming the flag, if B or B_ref exceeds N, or the target
        epsilon cannot be met.
    """
    return make_plan(
        dataset_size=dataset_size,
        batch_size=config.batch_size,
        steps=config.steps,
        delta=config.delta,
        augmult=config.augmult,
        accountant=config.accountant,
        target_eps=config.target_eps,
        noise_multiplier=config.noise_multiplier,
        ref_batch_size=config.ref_batch_size,
        ref_noise_multiplier=config.ref_noise_multiplier,
        noise_seeded=config.noise_seed is not None,
        reference_dataset_size=reference_dataset_size,
        clipped_fraction_std=config.clipped_fraction_std,
    )


def format_plan(
    plan: PrivacyPlan,
    dataset: str,
    noiseless: Sequence[str] = (),
    examples: Optional[str] = None,
    where_noiseless_go: str = "printed, and logged to TensorBoard",
) -> str:
    """The plan as text for a person, printed before training.

    Args:
      plan: The `PrivacyPlan`.
      dataset: Dataset name, for the header.
      examples: The training set's line (`TrainingSet.describe()`: N and any
        tuning split); None: "<dataset>, N=<N> training examples".
      noiseless: The outputs this run computes without noise on its training
        examples (`training_set.released_noiseless`): named as not covered.
      where_noiseless_go: Where the run writes them (the JAX program logs
        no TensorBoard).

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
    if examples is None:
        examples = f"{dataset}, N={plan.dataset_size} training examples"
    lines = [
        f"Privacy plan ({plan.accountant} accountant, Poisson sampling)",
        f"  dataset              {examples}",
        f"  batch_size B         {plan.batch_size}  (q = B/N = {plan.sampling_rate:.4g})",
        f"  noise_multiplier     {plan.noise_multiplier:.4g}  ({how})",
        f"  sigma/B              {short(plan.noise_multiplier / plan.batch_size)}",
        f"  steps S              {plan.steps}  (noisy updates, {epochs:.3g} epochs)",
        *_clipped_fraction_lines(plan),
        f"  augmult K            {plan.augmult}",
        f"  gradient evals S*B*K {plan.gradient_evaluations:,}",
        f"  delta                {plan.delta:g}",
        f"  epsilon              {short(plan.epsilon)}  (this run)",
        f"  eta (TAN)            {short(plan.eta)}",
        f"  eps_TAN              {short(plan.eps_tan)}",
    ]
    ref = plan.reference
    if ref is not None:
        ref_n = plan.reference_dataset_size or plan.dataset_size
        same_eta = "equal to this run's: same S and sigma/B"
        if ref_n != plan.dataset_size:
            same_eta = f"same S and sigma/B as this run, on the private run's N={ref_n}"
        lines += [
            "  reference run        "
            f"batch_size={ref.batch_size} noise_multiplier={ref.noise_multiplier:.4g} "
            f"steps={ref.steps} on N={ref_n}",
            f"  reference epsilon    {short(ref.epsilon)}",
            f"  reference eta        {short(ref.eta)}  ({same_eta})",
            f"  compute saving       {plan.compute_saving:.4g}x  (ref_batch_size / batch_size)",
            "NOT PRIVATE: this simulated run is NOT private. It reproduces the training "
            "dynamics of the reference run at a fraction of the cost, to tune "
            "hyper-parameters; only the reference run, once trained, guarantees "
            f"epsilon={short(ref.epsilon)} at delta={plan.delta:g}.",
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
            f"Private: this run guarantees ({short(plan.epsilon)}, {plan.delta:g})-DP "
            "for each training example."
        )
    if noiseless and plan.private:
        lines.append(
            f"Not covered by epsilon: {', '.join(noiseless)} ({where_noiseless_go}) are "
            "computed WITHOUT noise on the training examples. "
            "--release=private keeps them out of every output."
        )
    lines += [f"Warning: {note}" for note in plan.warnings]
    if not plan.simulation and plan.noise_multiplier > 0 and plan.overcharged:
        # With a noisy clipped count the verdict is on the accounted sigma.
        which = "noise_multiplier" if plan.clipped_fraction_std is None else "accounted sigma"
        lines.append(
            f"Warning: {which}={plan.accounted_noise_multiplier:.4g} < "
            f"{tan.OVERCHARGE_SIGMA:g}: the run is overcharged (epsilon well above eps_TAN). "
            "A larger batch at the same sigma/B keeps eta and costs less epsilon."
        )
    return "\n".join(lines)


def _clipped_fraction_lines(plan: PrivacyPlan) -> list:
    if plan.clipped_fraction_std is None:
        return []
    return [
        f"  clipped fraction     released with noise std {plan.clipped_fraction_std:g} "
        f"(count noise {short(plan.clipped_count_noise_std)}; alone: epsilon "
        f"{short(plan.clipped_fraction_epsilon)})",
        f"  accounted sigma      {plan.accounted_noise_multiplier:.4g}  (updates and "
        "clipped counts together: epsilon covers both)",
    ]


def model_settings(config: TrainConfig, plan: PrivacyPlan) -> dict:
    """The `make_private` arguments of a run, the same on both backends.

    Args:
      config: The run's settings.
      plan: Its privacy plan.

    Returns:
      {argument: value}: C, sigma, B, N, K, the EMA decay, the chunk size,
      what the train step releases and the clipped fraction's noise.
    """
    return dict(
        l2_norm_clip=config.l2_norm_clip,
        noise_multiplier=plan.noise_multiplier,
        expected_batch_size=plan.batch_size,
        dataset_size=plan.dataset_size,
        augmult=config.augmult,
        ema_decay=config.ema_decay,
        examples_per_chunk=config.examples_per_chunk,
        release_train_metrics=config.release == "all",
        clipped_fraction_std=plan.clipped_fraction_std,
    )
