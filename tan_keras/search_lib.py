"""The work behind `python -m tan_keras.search`: plain values in, results out.

A search tunes the non-privacy hyper-parameters of one private reference run
(B_ref, sigma_ref, S) on cheap simulations: every configuration of a grid is
trained at a small batch B with sigma = sigma_ref * B / B_ref and the same S
(same Total Amount of Noise, `planning.plan_simulation`), by the training
program `python -m tan_keras.train` in simulation mode. The simulations are
NOT private; only the final run at B_ref is, and this module prints its
exact command.

Layout of --output_dir:
  runs/<run name>/     one training run's model_dir (checkpoints, metrics.json)
  results.csv          one row per run (config, seed, B, sigma, accuracy, ...)
  results.json         runs, ranking, compute ledger, plan, final command

A run counts as finished when its metrics.json exists: a second invocation
skips it, resumes a run killed after a checkpoint (--resume) and restarts
one killed before its first checkpoint. Runs go through a `runner`: a
callable that trains from a list of `tan_keras.train` flags
(`subprocess_runner`, or `in_process_runner` where no other absl flags are
defined).
"""

import contextlib
import csv
import dataclasses
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from tan_keras import _validate, datasets, scaling
from tan_keras.privacy import planning
from tan_keras.train_config import CHECKPOINT_SUBDIR, METRICS_FILE

Config = Tuple[Tuple[str, str], ...]
Runner = Callable[[List[str], str], None]

# Flags the search sets itself; a grid or --train_flags must not set them.
CONTROLLED_FLAGS = tuple(
    "dataset batch_size steps noise_multiplier target_eps ref_batch_size ref_noise_multiplier "
    "seed model_dir metrics_json resume dry_run".split()
)
RUNS_SUBDIR = "runs"
# Grid values become file names: no path separators, no shell specials.
_VALUE = re.compile(r"[A-Za-z0-9._+-]+")
_NAME = re.compile(r"[a-z][a-z0-9_]*")


def parse_grid(specs: Sequence[str]) -> Tuple[Tuple[str, Tuple[str, ...]], ...]:
    """Parses grid axes: 'lr=1,2;augmult=1,2' or one axis per string.

    Each axis is `flag=v1,v2,...` (a `tan_keras.train` flag name and its
    values); axes are separated by ';' or given as separate strings (repeated
    --grid flags). The grid is the Cartesian product of the axes.

    Args:
      specs: The --grid values.

    Returns:
      ((flag, (value, ...)), ...) in the order given.

    Raises:
      ValueError: on a malformed axis, a repeated flag or value, a flag the
        search controls, or a value that is not a plain token.
    """
    axes: List[Tuple[str, Tuple[str, ...]]] = []
    for spec in specs:
        for axis in filter(None, (part.strip() for part in spec.split(";"))):
            name, sep, values = axis.partition("=")
            name = name.strip().lstrip("-")
            items = tuple(v.strip() for v in values.split(",") if v.strip())
            if not sep or not _NAME.fullmatch(name) or not items:
                raise _validate.invalid("grid", "axes like 'lr=1,2;augmult=1,2'", axis)
            if name in CONTROLLED_FLAGS:
                raise _validate.invalid(
                    "grid",
                    f"axes over flags the search does not set ({', '.join(CONTROLLED_FLAGS)} "
                    "are set by it)",
                    axis,
                )
            if name in dict(axes):
                raise _validate.invalid("grid", "each flag in one axis only", axis)
            bad = [v for v in items if not _VALUE.fullmatch(v)]
            if bad or len(set(items)) != len(items):
                raise _validate.invalid(
                    "grid", "distinct values made of letters, digits and ._+-", axis
                )
            axes.append((name, items))
    if not axes:
        raise _validate.invalid("grid", "at least one axis, e.g. 'lr=1,2'", list(specs))
    return tuple(axes)


@dataclasses.dataclass(frozen=True)
class SearchSpec:
    """What to search; validated on construction.

    Attributes:
      ref_batch_size: B_ref of the private run to tune.
      ref_noise_multiplier: sigma_ref of the private run.
      steps: S, shared by every run.
      batch_sizes: Simulation batch sizes B (each <= B_ref), ascending; the
        ranking is made at the largest, the others feed the scaling law.
      dataset: Dataset name (a `tan_keras.train --dataset`).
      grid: Axes from `parse_grid`.
      seeds: Training seeds; every config runs once per seed.
      output_dir: Where runs and results go.
      train_flags: Extra `tan_keras.train` flags for every run, e.g.
        ("--model=small_cnn",).
      metric: Metrics-JSON key to rank by (e.g. "test_accuracy_ema").
      confidence: Coverage of the prediction interval at B_ref.
    """

    ref_batch_size: int
    ref_noise_multiplier: float
    steps: int
    batch_sizes: Tuple[int, ...]
    dataset: str
    grid: Tuple[Tuple[str, Tuple[str, ...]], ...]
    seeds: Tuple[int, ...] = (0,)
    output_dir: str = "runs/search"
    train_flags: Tuple[str, ...] = ()
    metric: str = "test_accuracy_ema"
    confidence: float = 0.95

    def __post_init__(self):
        set_ = object.__setattr__
        ref = _validate.positive_int("ref_batch_size", self.ref_batch_size)
        set_(self, "ref_batch_size", ref)
        set_(
            self,
            "ref_noise_multiplier",
            _validate.positive("ref_noise_multiplier", self.ref_noise_multiplier),
        )
        set_(self, "steps", _validate.positive_int("steps", self.steps))
        _validate.one_of("dataset", self.dataset, datasets.DATASET_NAMES)
        hint = "A simulation is a smaller, cheaper run than the reference"
        sizes = [
            _validate.integer("batch_size", b, low=1, high=ref, hint=hint) for b in self.batch_sizes
        ]
        if not sizes or len(set(sizes)) != len(sizes):
            raise _validate.invalid("batch_size", "distinct batch sizes", list(self.batch_sizes))
        set_(self, "batch_sizes", tuple(sorted(sizes)))
        seeds = [_validate.integer("seeds", s, low=0) for s in self.seeds]
        if not seeds or len(set(seeds)) != len(seeds):
            raise _validate.invalid("seeds", "distinct integers >= 0", list(self.seeds))
        set_(self, "seeds", tuple(seeds))
        if not self.grid:
            raise _validate.invalid("grid", "at least one axis, e.g. 'lr=1,2'", self.grid)
        for flag in self.train_flags:
            name = flag.lstrip("-").partition("=")[0]
            if not flag.startswith("--") or name in CONTROLLED_FLAGS or name in dict(self.grid):
                raise _validate.invalid(
                    "train_flags",
                    "--name=value flags the search and the grid do not set",
                    flag,
                )
        _validate.real(
            "confidence",
            self.confidence,
            low=0.0,
            high=1.0,
            low_inclusive=False,
            high_inclusive=False,
        )

    @property
    def configs(self) -> List[Config]:
        """Every grid point, as ((flag, value), ...), in grid order."""
        names = [name for name, _ in self.grid]
        return [
            tuple(zip(names, values)) for values in itertools.product(*dict(self.grid).values())
        ]

    @property
    def rank_batch_size(self) -> int:
        """The simulation batch size the ranking is made at (the largest)."""
        return self.batch_sizes[-1]


def config_label(config: Config) -> str:
    """'lr=1 augmult=2': a config as a person reads it."""
    return " ".join(f"{name}={value}" for name, value in config)


def run_name(config: Config, batch_size: int, seed: int) -> str:
    """The run's directory name, e.g. 'lr=1,augmult=2,B=64,seed=0'."""
    return ",".join([f"{n}={v}" for n, v in config] + [f"B={batch_size}", f"seed={seed}"])


def run_dir(spec: SearchSpec, config: Config, batch_size: int, seed: int) -> str:
    """The model_dir of one simulated run: <output_dir>/runs/<run name>."""
    return os.path.join(spec.output_dir, RUNS_SUBDIR, run_name(config, batch_size, seed))


def simulation_argv(spec: SearchSpec, config: Config, batch_size: int, seed: int) -> List[str]:
    """The `tan_keras.train` flags of one simulated run (without --resume).

    Args:
      spec: The search.
      config: One grid point.
      batch_size: The simulation's B.
      seed: Training seed.

    Returns:
      Flags: --train_flags first, so that the search's own flags win.
    """
    model_dir = run_dir(spec, config, batch_size, seed)
    return [
        *spec.train_flags,
        *[f"--{name}={value}" for name, value in config],
        f"--dataset={spec.dataset}",
        f"--batch_size={batch_size}",
        f"--steps={spec.steps}",
        f"--ref_batch_size={spec.ref_batch_size}",
        f"--ref_noise_multiplier={_exact(spec.ref_noise_multiplier)}",
        f"--seed={seed}",
        f"--model_dir={model_dir}",
    ]


def final_argv(spec: SearchSpec, config: Config) -> List[str]:
    """The `tan_keras.train` flags of the private run with `config` at B_ref."""
    return [
        *spec.train_flags,
        *[f"--{name}={value}" for name, value in config],
        f"--dataset={spec.dataset}",
        f"--batch_size={spec.ref_batch_size}",
        f"--noise_multiplier={_exact(spec.ref_noise_multiplier)}",
        f"--steps={spec.steps}",
        f"--model_dir={os.path.join(spec.output_dir, 'final')}",
    ]


def _exact(value: float) -> str:
    # repr round-trips a float exactly (:g would keep 6 digits); 4.0 -> "4".
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def command_line(argv: Sequence[str]) -> str:
    """'python -m tan_keras.train ...', quoted for a POSIX shell."""
    return " ".join(["python -m tan_keras.train", *map(shlex.quote, argv)])


def subprocess_runner(log_dir: Optional[str] = None) -> Runner:
    """A runner that trains in a fresh `python -m tan_keras.train` process.

    Args:
      log_dir: Where each run's stdout+stderr goes (<log_dir>/<n>.log), or
        None to inherit this process's streams.

    Returns:
      runner(argv, name): trains; raises RuntimeError with the log's tail on
      failure. Its log is <log_dir>/<name>.log.
    """

    def run(argv: List[str], name: str) -> None:
        command = [sys.executable, "-m", "tan_keras.train", *argv]
        if log_dir is None:
            code = subprocess.call(command)
            tail = ""
        else:
            os.makedirs(log_dir, exist_ok=True)
            path = os.path.join(log_dir, f"{name}.log")
            with open(path, "w", encoding="utf-8") as log:
                code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
            with open(path, encoding="utf-8") as log:
                tail = "".join(log.readlines()[-15:])
        if code != 0:
            raise RuntimeError(f"{command_line(argv)} failed with status {code}:\n{tail}")

    return run


def in_process_runner(log_dir: Optional[str] = None) -> Runner:
    """A runner that calls `tan_keras.train.cli` in this process.

    Faster (TensorFlow loads once), but `tan_keras.train` defines absl flags:
    use it only where no other module defines the same names (experiments,
    tests), never from `python -m tan_keras.search`.

    Args:
      log_dir: Where each run's printed output goes (<log_dir>/<name>.log),
        or None to leave it on this process's streams.

    Returns:
      runner(argv, name): trains; raises RuntimeError on a non-zero exit status.
    """
    from tan_keras import train

    def run(argv: List[str], name: str) -> None:
        with contextlib.ExitStack() as stack:
            if log_dir is not None:
                os.makedirs(log_dir, exist_ok=True)
                log = stack.enter_context(
                    open(os.path.join(log_dir, f"{name}.log"), "w", encoding="utf-8")
                )
                stack.enter_context(contextlib.redirect_stdout(log))
                stack.enter_context(contextlib.redirect_stderr(log))
            try:
                train.cli(["tan_keras.train", *argv])
            except SystemExit as done:
                if done.code not in (0, None):
                    raise RuntimeError(f"{command_line(argv)} exited with {done.code}") from None

    return run


def check_command(argv: List[str], runner: Runner) -> None:
    """Runs `tan_keras.train` flags with --dry_run: validated, nothing trained.

    Raises:
      RuntimeError: if tan_keras.train refuses the flags.
    """
    runner([*argv, "--dry_run"], "final_dry_run")


def run_search(spec: SearchSpec, runner: Runner, log: Callable[[str], None] = print):
    """Trains every (config, batch size, seed) not finished yet.

    Args:
      spec: The search.
      runner: Trains from `tan_keras.train` flags (see `subprocess_runner`).
      log: Progress sink, one line per run.

    Returns:
      (records, trained, skipped): one record per run (its metrics JSON plus
      "config", "run" and "seed"), and how many runs were trained now and
      skipped as already finished.

    Raises:
      RuntimeError: if a run fails or writes no metrics.
    """
    records, trained, skipped = [], 0, 0
    jobs = [(c, b, s) for b in spec.batch_sizes for c in spec.configs for s in spec.seeds]
    for i, (config, batch_size, seed) in enumerate(jobs, 1):
        argv = simulation_argv(spec, config, batch_size, seed)
        model_dir = run_dir(spec, config, batch_size, seed)
        metrics_path = os.path.join(model_dir, METRICS_FILE)
        name = run_name(config, batch_size, seed)
        if os.path.exists(metrics_path):
            skipped += 1
            log(f"[{i}/{len(jobs)}] skipped (finished): {name}")
        else:
            resume = _prepare_model_dir(model_dir)
            log(f"[{i}/{len(jobs)}] {'resuming' if resume else 'training'}: {name}")
            runner(argv + (["--resume"] if resume else []), name)
            if not os.path.exists(metrics_path):
                raise RuntimeError(f"run {name} wrote no {metrics_path}")
            trained += 1
        with open(metrics_path, encoding="utf-8") as f:
            metrics = json.load(f)
        if metrics.get(spec.metric) is None:
            raise _validate.invalid("metric", f"a key with a value in {metrics_path}", spec.metric)
        records.append({**metrics, "config": config, "run": name, "seed": seed})
    return records, trained, skipped


def _prepare_model_dir(model_dir: str) -> bool:
    """Whether to --resume an unfinished run; clears one with no checkpoint."""
    checkpoints = os.path.join(model_dir, CHECKPOINT_SUBDIR)
    if os.path.isdir(checkpoints) and any(n.endswith(".index") for n in os.listdir(checkpoints)):
        return True
    if os.path.isdir(model_dir):
        # Killed before its first checkpoint: nothing to resume, and
        # tan_keras.train refuses a non-empty model_dir without --resume.
        shutil.rmtree(model_dir)
    return False


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
      reference's privacy), "best", "final_argv" and "final_command".
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
    plan = planning.plan_simulation(
        spec.ref_batch_size,
        spec.ref_noise_multiplier,
        spec.steps,
        first["dataset_size"],
        first["delta"],
        spec.rank_batch_size,
        augmult[best],
        first.get("accountant", "rdp"),
    )
    result = {
        "metric": spec.metric,
        "ranking": [_ranked(r) for r in ranking],
        "rankings": {str(b): [_ranked(r) for r in rk] for b, rk in rankings.items()},
        "rank_correlation": None,
        "prediction": None,
        "ledger": ledger.to_dict(),
        "plan": plan.to_dict(),
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
        f"Final private run: B={ref['batch_size']} sigma={ref['noise_multiplier']:g} "
        f"S={ref['steps']}: epsilon={_num(ref['epsilon'])} at delta={plan['delta']:g} "
        f"(eta={ref['eta']:.4g}, eps_TAN={_num(ref['eps_tan'])}"
        + (", OVERCHARGED: sigma < 2)" if ref["overcharged"] else ")"),
        summary["final_command"],
    ]
    return "\n".join(lines)


def _num(value: Optional[float]) -> str:
    return "inf" if value is None else f"{value:.4g}"
