"""What a search found: ranking, scaling law, compute ledger, final command.

`summarize` turns the records of `search_lib.run_search` into the search's
results (a JSON-ready dict); `write_results` saves them as results.csv and
results.json in the search's output directory; `format_report` prints them
for a person.
"""

import csv
import dataclasses
import json
import os
from typing import Any, Dict, List, Tuple

from tan_keras import _numbers
from tan_keras.analysis import scaling
from tan_keras.privacy.plan import make_plan
from tan_keras.training.search_lib import SearchSpec, command_line, config_label, final_argv


def summarize(spec: SearchSpec, records: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Ranking, scaling-law prediction, compute ledger and final command.

    Args:
      spec: The search.
      records: From `run_search`.

    Returns:
      A JSON-ready dict: "ranking" (at the largest simulated B), "rankings"
      (per B), "rank_correlation" (Spearman/Kendall of the config means
      between the smallest and largest B, with >= 2 B and >= 3 configs),
      "prediction" (the best config's law a - b log2 B extrapolated to one
      run at B_ref, with >= 2 B; optimistic, since that config was selected
      for scoring best), "ledger", "plan" (the simulation's and the
      reference's privacy), "coverage" (what the tuning trained on, the
      sets' sizes, and the one-sentence "statement" of what the final run's
      guarantee covers), "best", "final_argv" and "final_command".
    """
    rankings = {
        b: scaling.rank_configs(
            (r["config"], r[spec.metric]) for r in records if r["batch_size"] == b
        )
        for b in spec.batch_sizes
    }
    ranking = rankings[spec.rank_batch_size]
    best = ranking[0].config
    first = records[0]
    augmult = {r["config"]: r["augmult"] for r in records}
    ledger = scaling.compute_ledger(
        ((r["steps"], r["batch_size"], r["augmult"]) for r in records),
        spec.ref_batch_size,
        final_run=(spec.steps, augmult[best]),
    )
    plan = make_plan(
        dataset_size=first["dataset_size"],
        batch_size=spec.rank_batch_size,
        steps=spec.steps,
        delta=first["delta"],
        augmult=augmult[best],
        accountant=first.get("accountant", "rdp"),
        ref_batch_size=spec.ref_batch_size,
        ref_noise_multiplier=spec.ref_noise_multiplier,
        reference_dataset_size=first.get("reference_dataset_size"),
        clipped_fraction_std=first.get("clipped_fraction_std"),
    )
    result = {
        "metric": spec.metric,
        "ranking": [_ranked(r) for r in ranking],
        "rankings": {str(b): [_ranked(r) for r in rk] for b, rk in rankings.items()},
        "rank_correlation": None,
        "prediction": None,
        "ledger": ledger.to_dict(),
        "plan": plan.runs_dict(),
        "coverage": coverage(spec, first, plan.reference.epsilon, plan.delta),
        "best": dict(best),
        "final_argv": final_argv(spec, best),
        "final_command": command_line(final_argv(spec, best)),
    }
    if len(spec.batch_sizes) > 1 and len(ranking) >= 3:
        ends = (spec.batch_sizes[0], spec.rank_batch_size)
        means = [{r.config: r.mean for r in rankings[b]} for b in ends]
        small, large = ([m[c] for c in spec.configs] for m in means)
        result["rank_correlation"] = {
            "batch_sizes": list(ends),
            "spearman": scaling.spearman(small, large),
            "kendall_tau": scaling.kendall_tau(small, large),
        }
    points = [(r["batch_size"], r[spec.metric]) for r in records if r["config"] == best]
    if len(spec.batch_sizes) > 1 and len(points) >= 3:
        fit = scaling.fit_log_linear(*zip(*points))
        result["prediction"] = {
            "fit": fit.to_dict(),
            "at_reference": fit.predict(spec.ref_batch_size, spec.confidence).to_dict(),
        }
    return result


def coverage(
    spec: SearchSpec, record: Dict[str, Any], epsilon: float, delta: float
) -> Dict[str, Any]:
    """What the final run's guarantee covers, given what the simulations trained on.

    Args:
      spec: The search.
      record: One simulation's metrics (its training set's sizes).
      epsilon: The final run's epsilon.
      delta: Its delta.

    Returns:
      {"mode": `SearchSpec.tuning_mode`, "covers_tuning": whether the
      guarantee covers the choice of hyper-parameters, "tuning_set" and
      "private_set" ({"dataset", "examples"}), "statement": one sentence a
      reviewer can quote}.
    """
    mode = spec.tuning_mode
    tuned_n = record["dataset_size"]
    private_n = record.get("reference_dataset_size") or tuned_n
    guarantee = f"(epsilon={_numbers.short(epsilon)}, delta={delta:g})"
    if mode == "private_set":
        statement = (
            f"NOT COVERED: the simulations trained on the same {private_n} {spec.dataset} "
            f"examples as the final run, without a privacy guarantee, so the final run's "
            f"{guarantee} covers its noisy weights for the hyper-parameters it is given, but "
            "not the choice of those hyper-parameters, which depends on these examples "
            "(hold out a tuning split with --tuning_examples, or tune on other data with "
            "--tuning_dataset, to cover it)."
        )
        tuning = {"dataset": spec.dataset, "examples": tuned_n}
    elif mode == "tuning_split":
        statement = (
            f"COVERED: the simulations trained only on the {tuned_n} tuning examples held out "
            f"of the {spec.dataset} train split (--tuning_examples={spec.tuning_examples} "
            f"--tuning_split_seed={spec.tuning_split_seed}); the final run trains on the other "
            f"{private_n}, and its {guarantee} covers every one of them, the choice of its "
            f"hyper-parameters included; the {tuned_n} tuning examples have no privacy "
            "guarantee."
        )
        tuning = {"dataset": spec.dataset, "examples": tuned_n}
    else:
        statement = (
            f"COVERED: the simulations trained only on {spec.tuning_dataset} ({tuned_n} "
            f"examples), none of the final run's {private_n} {spec.dataset} examples, so its "
            f"{guarantee} covers every one of them, the choice of its hyper-parameters "
            f"included, provided {spec.tuning_dataset} shares no example with "
            f"{spec.dataset}."
        )
        tuning = {"dataset": spec.tuning_dataset, "examples": tuned_n}
    return {
        "mode": mode,
        "covers_tuning": mode != "private_set",
        "tuning_set": tuning,
        "private_set": {"dataset": spec.dataset, "examples": private_n},
        "statement": statement,
    }


def _ranked(entry: scaling.RankedConfig) -> Dict[str, Any]:
    as_dict = dataclasses.asdict(entry)
    return {**as_dict, "config": dict(entry.config), "accuracies": list(entry.accuracies)}


# Columns of results.csv after the grid's flags.
_CSV_COLUMNS = tuple(
    "seed batch_size noise_multiplier steps augmult eta epsilon reference_epsilon "
    "gradient_evaluations test_accuracy test_accuracy_ema wall_time_s".split()
)


def write_results(
    spec: SearchSpec, records: List[Dict[str, Any]], summary: Dict[str, Any]
) -> Tuple[str, str]:
    """Writes results.csv (one row per run) and results.json (everything).

    Args:
      spec: The search.
      records: From `run_search`.
      summary: From `summarize`.

    Returns:
      The paths of results.csv and results.json.
    """
    names = [name for name, _ in spec.grid]
    # dict.fromkeys: ordered and without duplicates (a grid over augmult).
    columns = list(dict.fromkeys(["run", *names, *_CSV_COLUMNS, spec.metric]))
    csv_path = os.path.join(spec.output_dir, "results.csv")
    json_path = os.path.join(spec.output_dir, "results.json")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for record in records:
            writer.writerow({**record, **dict(record["config"])})
    runs = [{**r, "config": dict(r["config"])} for r in records]
    search = dataclasses.asdict(spec)
    search["grid"] = {name: list(values) for name, values in spec.grid}
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump({"search": search, **summary, "runs": runs}, f, indent=2, sort_keys=True)
        f.write("\n")
    return csv_path, json_path


def format_report(summary: Dict[str, Any], trained: int, skipped: int) -> str:
    """The ranking, ledger, privacy and final command as text for a person.

    Args:
      summary: From `summarize`.
      trained: Runs trained by this invocation.
      skipped: Runs skipped as already finished.

    Returns:
      Multi-line text without a trailing newline.
    """
    plan, ledger = summary["plan"], summary["ledger"]
    sim, ref = plan["simulation"], plan["reference"]
    lines = [
        f"Runs: {trained} trained, {skipped} skipped (already finished).",
        f"Ranking by {summary['metric']} at B={sim['batch_size']} "
        f"(sigma={sim['noise_multiplier']:.4g}, S={sim['steps']}, eta={sim['eta']:.4g}; "
        "NOT private simulations):",
    ]
    for entry in summary["ranking"]:
        label = config_label(tuple(entry["config"].items()))
        lines.append(
            f"  {entry['rank']:>3}. {label:<40} {entry['mean']:.4f} +- {entry['std']:.4f} "
            f"(n={entry['num_seeds']})"
        )
    corr = summary["rank_correlation"]
    if corr:
        lines.append(
            f"Rank agreement between B={corr['batch_sizes'][0]} and B={corr['batch_sizes'][1]}: "
            f"Spearman {corr['spearman']:.3f}, Kendall tau {corr['kendall_tau']:.3f}"
        )
    pred = summary["prediction"]
    if pred:
        fit, at = pred["fit"], pred["at_reference"]
        lines.append(
            f"Scaling law (best config): acc = {fit['intercept']:.4f} - {fit['slope']:.4f} "
            f"* log2(B); predicted at B_ref={at['batch_size']:g}: {at['accuracy']:.4f} "
            f"[{at['lower']:.4f}, {at['upper']:.4f}] ({at['confidence']:.0%} prediction "
            "interval, extrapolated)"
        )
    lines += [
        "Compute ledger (per-example gradient evaluations, S*B*K):",
        *(
            f"  {label:<32}{value}"
            for label, value in (
                (f"search ({ledger['num_runs']} runs)", f"{ledger['search_evaluations']:,}"),
                (
                    f"same search at B_ref={ledger['ref_batch_size']}",
                    f"{ledger['reference_search_evaluations']:,}",
                ),
                ("saving", f"{ledger['saving']:.4g}x"),
                ("final private run", f"{ledger['final_run_evaluations']:,}"),
                ("search + final run", f"{ledger['total_evaluations']:,}"),
            )
        ),
        f"Tuning set: {_examples(summary['coverage']['tuning_set'])}; private set (final "
        f"run): {_examples(summary['coverage']['private_set'])}.",
        summary["coverage"]["statement"],
        f"Final private run: B={ref['batch_size']} sigma={ref['noise_multiplier']:g} "
        f"S={ref['steps']}: epsilon={_numbers.short(ref['epsilon'])} at delta={plan['delta']:g} "
        f"(eta={ref['eta']:.4g}, eps_TAN={_numbers.short(ref['eps_tan'])}"
        + (", OVERCHARGED: sigma < 2)" if ref["overcharged"] else ")"),
        summary["final_command"],
    ]
    return "\n".join(lines)


def _examples(examples: Dict[str, Any]) -> str:
    return f"{examples['examples']} {examples['dataset']} examples"
