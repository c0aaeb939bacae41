"""A training run's results: the metrics JSON and the end-of-run summary; no TensorFlow.

Both backends' programs (`train_lib` on TensorFlow, `jax_run` on JAX) end
with `final_metrics`, `write_metrics` and `describe_metrics`.
"""

import json
import os
from typing import Any, Dict, List, Optional

from tan_keras import _numbers
from tan_keras.privacy import accounting, tan
from tan_keras.privacy.plan import PrivacyPlan
from tan_keras.training import training_set
from tan_keras.training.train_config import TrainConfig


def final_metrics(
    config: TrainConfig,
    plan: PrivacyPlan,
    dp_steps: int,
    accuracies: Dict[str, Optional[float]],
    wall_time_s: float,
    model_dir: str,
    examples: Optional[training_set.TrainingSet] = None,
) -> Dict[str, Any]:
    """The metrics JSON object: accuracies and the privacy actually spent.

    Epsilon, eta and the gradient count are those of the `dp_steps` updates
    actually applied (S for a completed run).

    Args:
      config: Run settings.
      plan: The privacy plan.
      dp_steps: Noisy updates applied (`model.dp_steps`).
      accuracies: From `evaluate`.
      wall_time_s: Wall time of this process.
      model_dir: The run directory.
      examples: The examples the run trained on (None: the whole train split
        of N = plan.dataset_size).

    Returns:
      One flat JSON-ready dict (non-finite numbers are None). Besides the
      numbers, it says what it covers: "training_set" (all, private or
      tuning) with the split's sizes, "release", and
      "noiseless_private_outputs", the statistics the run printed and logged
      without noise on its training examples (none with --release=private;
      every number in this file is private or computed on the test split).
    """
    if examples is None:
        examples = training_set.TrainingSet(
            config.dataset, "all", plan.dataset_size, plan.dataset_size
        )
    metrics = plan.to_dict()
    epsilon = accounting.compute_epsilon(
        plan.accounted_noise_multiplier,
        plan.sampling_rate,
        dp_steps,
        plan.delta,
        plan.accountant,
    )
    eta = plan.eta_after(dp_steps)
    metrics.update(
        accuracies,
        epsilon=_numbers.json_safe(epsilon),
        eta=_numbers.json_safe(eta),
        eps_tan=_numbers.json_safe(tan.eps_tan(eta, plan.delta)),
        steps=dp_steps,
        planned_steps=plan.steps,
        gradient_evaluations=dp_steps * plan.batch_size * plan.augmult,
        dataset=config.dataset,
        model=config.model,
        model_dir=model_dir,
        wall_time_s=round(wall_time_s, 3),
        release=config.release,
        noiseless_private_outputs=list(training_set.released_noiseless(config)),
        **examples.to_dict(),
    )
    return metrics


def write_metrics(path: str, metrics: Dict[str, Any]) -> None:
    """Writes `metrics` as JSON atomically (a reader never sees half a file).

    Args:
      path: Destination file; its directory is created if needed.
      metrics: A JSON-ready dict.
    """
    write_json_atomically(path, metrics)


def write_json_atomically(path: str, record: Dict[str, Any]) -> None:
    """Writes `record` as JSON to `path` atomically, owner-only (0600)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    # Owner-only from creation: the run's records describe private data.
    with open(
        os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8"
    ) as f:
        json.dump(record, f, indent=2, sort_keys=True, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def describe_metrics(metrics: Dict[str, Any]) -> List[str]:
    """The end-of-run summary.

    Args:
      metrics: From `final_metrics`.

    Returns:
      Two lines: the accuracies, then the privacy spent.
    """

    def fmt(value):
        return "n/a" if value is None else f"{value:.4f}"

    lines = [
        f"test_accuracy={fmt(metrics['test_accuracy'])} "
        f"test_accuracy_ema={fmt(metrics['test_accuracy_ema'])} "
        f"test_accuracy_tta={fmt(metrics['test_accuracy_tta'])}",
        f"dp_steps={metrics['steps']} epsilon={fmt(metrics['epsilon'])} "
        f"delta={metrics['delta']:g} eta={fmt(metrics['eta'])} "
        f"private={metrics['private']} wall_time_s={metrics['wall_time_s']:.1f}",
    ]
    return lines
