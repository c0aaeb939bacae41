"""The work behind `python -m tan_keras.search`: plain values in, results out.

A search tunes the non-privacy hyper-parameters of one private reference run
(B_ref, sigma_ref, S) on cheap simulations: every configuration of a grid is
trained at a small batch B with sigma = sigma_ref * B / B_ref and the same S
(same Total Amount of Noise, `tan_keras.privacy.plan`), by the training
program (`program.run`) in simulation mode, in this process. The simulations
are NOT private; only the final run at B_ref is, and this module prints its
exact command.

What the simulations train on decides what the final run's guarantee covers
(`SearchSpec.tuning_mode`): the private set itself (the default, as in the
paper: the chosen hyper-parameters are then a function of the private
examples that no guarantee covers), a tuning split held out of it
(--tuning_examples: the final run trains on the rest), or another dataset
(--tuning_dataset, e.g. a public proxy).

Every run is one typed `TrainConfig`: the fixed training flags (parsed once),
overridden by the grid point's settings and the search's own (dataset, B, S,
the reference run, seed, model_dir).

Layout of --output_dir:
  runs/<run name>/     one training run's model_dir (checkpoints, metrics.json)
  results.csv          one row per run (config, seed, B, sigma, accuracy, ...)
  results.json         runs, ranking, compute ledger, plan, final command

A run counts as finished when its metrics.json exists: a second invocation
skips it, resumes a run killed after a checkpoint (--resume) and restarts
one killed before its first checkpoint. Runs go through a `runner`: a
callable that trains one `TrainConfig` (`in_process_runner`).
"""

import contextlib
import dataclasses
import functools
import itertools
import json
import os
import re
import shlex
import shutil
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from tan_keras import _backend, _validate
from tan_keras.data import datasets
from tan_keras.training import program, train_flags
from tan_keras.training.train_config import (
    CHECKPOINT_SUBDIR,
    CONFIG_FILE,
    METRICS_FILE,
    RECIPES,
    TrainConfig,
)

Config = Tuple[Tuple[str, str], ...]
Runner = Callable[[TrainConfig, str], None]

# Flags the search sets itself; a grid or --train_flags must not set them.
CONTROLLED_FLAGS = tuple(
    "dataset batch_size steps noise_multiplier target_eps ref_batch_size ref_noise_multiplier "
    "seed model_dir metrics_json resume dry_run delete_checkpoints tuning_examples "
    "tuning_split_seed train_on ref_dataset_size".split()
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
            if name not in train_flags.NAMES:
                raise _validate.invalid("grid", "axes over tan_keras.train flags", axis)
            bad = [v for v in items if not _VALUE.fullmatch(v)]
            if bad or len(set(items)) != len(items):
                raise _validate.invalid(
                    "grid", "distinct values made of letters, digits and ._+-", axis
                )
            for value in items:
                typed_value(name, value)  # a bad value fails now, not after hours
            axes.append((name, items))
    if not axes:
        raise _validate.invalid("grid", "at least one axis, e.g. 'lr=1,2'", list(specs))
    return tuple(axes)


def typed_value(name: str, text: str) -> Any:
    """A grid value as the setting `tan_keras.train --name=text` would hold.

    Raises:
      ValueError: naming the flag, if the program would refuse the value.
    """
    return train_flags.parse([f"--{name}={text}"])[name]


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
      keep_checkpoints: Keep each finished simulation's checkpoints (by
        default deleted: they hold the runs' noise and sampling keys).
      tuning_examples: Hold out this many examples of the dataset's train
        split (`tan_keras.data.splits`): the simulations train on them only,
        the final run on the others. None: no split.
      tuning_split_seed: Public seed of that split.
      tuning_dataset: Train the simulations on this dataset instead (a
        public proxy), never on `dataset`. None: no proxy.
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
    keep_checkpoints: bool = False
    tuning_examples: Optional[int] = None
    tuning_split_seed: int = 0
    tuning_dataset: Optional[str] = None

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
        try:
            settings = train_flags.parse(self.train_flags)
        except ValueError as err:
            raise _validate.invalid(
                "train_flags", "flags tan_keras.train accepts", " ".join(self.train_flags), str(err)
            ) from None
        for name in settings:
            if name in CONTROLLED_FLAGS or name in dict(self.grid):
                # e.g. set through a --flagfile
                raise _validate.invalid(
                    "train_flags", "flags the search and the grid do not set", f"--{name}"
                )
        _validate.real(
            "confidence",
            self.confidence,
            low=0.0,
            high=1.0,
            low_inclusive=False,
            high_inclusive=False,
        )
        self._check_tuning_data()

    def _check_tuning_data(self):
        set_ = object.__setattr__
        if self.tuning_examples is not None:
            set_(
                self,
                "tuning_examples",
                _validate.positive_int("tuning_examples", self.tuning_examples),
            )
        set_(
            self,
            "tuning_split_seed",
            _validate.integer("tuning_split_seed", self.tuning_split_seed, low=0),
        )
        if self.tuning_split_seed != 0 and self.tuning_examples is None:
            raise _validate.invalid(
                "tuning_split_seed",
                "0 (unset) unless --tuning_examples holds out a tuning split",
                self.tuning_split_seed,
            )
        if self.tuning_dataset is None:
            return
        _validate.one_of("tuning_dataset", self.tuning_dataset, datasets.DATASET_NAMES)
        if self.tuning_dataset == self.dataset:
            raise _validate.invalid(
                "tuning_dataset",
                f"another dataset than --dataset={self.dataset} (the private one)",
                self.tuning_dataset,
                "To tune on part of the private dataset, hold it out with --tuning_examples",
            )
        if self.tuning_examples is not None:
            raise _validate.invalid(
                "tuning_dataset",
                "unset with --tuning_examples (the simulations tune on one or the other)",
                self.tuning_dataset,
            )

    @property
    def tuning_mode(self) -> str:
        """What the simulations train on: "private_set", "tuning_split" or "proxy_dataset"."""
        if self.tuning_examples is not None:
            return "tuning_split"
        if self.tuning_dataset is not None:
            return "proxy_dataset"
        return "private_set"

    @functools.cached_property
    def private_dataset_size(self) -> int:
        """N of the final run's dataset's train split (read once; known N without data)."""
        data_dir = self.base_settings.get("data_dir")
        try:
            return datasets.load_dataset(self.dataset, data_dir).size
        except datasets.DatasetUnavailableError:
            return datasets.known_facts(self.dataset).size

    @property
    def configs(self) -> List[Config]:
        """Every grid point, as ((flag, value), ...), in grid order."""
        names = [name for name, _ in self.grid]
        return [
            tuple(zip(names, values)) for values in itertools.product(*dict(self.grid).values())
        ]

    @property
    def base_settings(self) -> Dict[str, Any]:
        """The typed settings of --train_flags, shared by every run."""
        return train_flags.parse(self.train_flags)

    @property
    def rank_batch_size(self) -> int:
        """The simulation batch size the ranking is made at (the largest)."""
        return self.batch_sizes[-1]


def tuning_data_line(spec: SearchSpec) -> str:
    """What the simulations will train on, printed before the first run."""
    if spec.tuning_mode == "tuning_split":
        return (
            f"Tuning on a split of {spec.tuning_examples} examples held out of the {spec.dataset} "
            f"train split (seed {spec.tuning_split_seed}); the final run trains on the others."
        )
    if spec.tuning_mode == "proxy_dataset":
        return (
            f"Tuning on {spec.tuning_dataset}; the final run trains on {spec.dataset}, which "
            "the simulations never see."
        )
    return (
        f"Tuning on the private set (the {spec.dataset} train split, the final run's): the "
        "final run's guarantee will NOT cover the choice of its hyper-parameters "
        "(--tuning_examples or --tuning_dataset would)."
    )


def config_label(config: Config) -> str:
    """'lr=1 augmult=2': a config as a person reads it."""
    return " ".join(f"{name}={value}" for name, value in config)


def run_name(config: Config, batch_size: int, seed: int) -> str:
    """The run's directory name, e.g. 'lr=1,augmult=2,B=64,seed=0'."""
    return ",".join([f"{n}={v}" for n, v in config] + [f"B={batch_size}", f"seed={seed}"])


def run_dir(spec: SearchSpec, config: Config, batch_size: int, seed: int) -> str:
    """The model_dir of one simulated run: <output_dir>/runs/<run name>."""
    return os.path.join(spec.output_dir, RUNS_SUBDIR, run_name(config, batch_size, seed))


def simulation_settings(
    spec: SearchSpec, config: Config, batch_size: int, seed: int
) -> Dict[str, Any]:
    """The typed settings of one simulated run (without resume).

    Args:
      spec: The search.
      config: One grid point.
      batch_size: The simulation's B.
      seed: Training seed.

    Returns:
      {setting: value}: --train_flags, overridden by the grid point, then by
      the search's own settings.
    """
    return {
        **spec.base_settings,
        **{name: typed_value(name, value) for name, value in config},
        "dataset": spec.tuning_dataset or spec.dataset,
        "batch_size": batch_size,
        "steps": spec.steps,
        "ref_batch_size": spec.ref_batch_size,
        "ref_noise_multiplier": spec.ref_noise_multiplier,
        "seed": seed,
        "model_dir": run_dir(spec, config, batch_size, seed),
        "delete_checkpoints": not spec.keep_checkpoints,
        **_tuning_data_settings(spec),
    }


def _tuning_data_settings(spec: SearchSpec) -> Dict[str, Any]:
    """What a simulation trains on besides --dataset: the tuning split, or the proxy's N."""
    if spec.tuning_mode == "tuning_split":
        return {
            "tuning_examples": spec.tuning_examples,
            "tuning_split_seed": spec.tuning_split_seed,
            "train_on": "tuning",
        }
    if spec.tuning_mode == "proxy_dataset":
        # The simulated private run trains on the other dataset (its N), with
        # that dataset's recipe where the search sets nothing: the proxy's
        # own recipe would tune other settings than the final run's.
        given = {**spec.base_settings, **dict(spec.grid)}
        recipe = {
            name: value
            for name, value in RECIPES[spec.dataset].items()
            if name not in given and name not in ("batch_size", "steps", "physical_batch_size")
        }
        return {**recipe, "ref_dataset_size": spec.private_dataset_size}
    return {}


def final_settings(spec: SearchSpec, config: Config) -> Dict[str, Any]:
    """The typed settings of the private run with `config` at B_ref."""
    return {
        **spec.base_settings,
        **{name: typed_value(name, value) for name, value in config},
        "dataset": spec.dataset,
        "batch_size": spec.ref_batch_size,
        "noise_multiplier": spec.ref_noise_multiplier,
        "steps": spec.steps,
        "model_dir": os.path.join(spec.output_dir, "final"),
        # The private set: the train split minus the examples tuned on.
        **(
            {"tuning_examples": spec.tuning_examples, "tuning_split_seed": spec.tuning_split_seed}
            if spec.tuning_mode == "tuning_split"
            else {}
        ),
    }


def simulation_argv(spec: SearchSpec, config: Config, batch_size: int, seed: int) -> List[str]:
    """`simulation_settings` as `tan_keras.train` flags."""
    return train_flags.to_argv(simulation_settings(spec, config, batch_size, seed))


def final_argv(spec: SearchSpec, config: Config) -> List[str]:
    """`final_settings` as `tan_keras.train` flags (exact numbers)."""
    return train_flags.to_argv(final_settings(spec, config))


def command_line(argv: Sequence[str]) -> str:
    """'python -m tan_keras.train ...', quoted for a POSIX shell.

    On Keras's JAX backend it starts with `KERAS_BACKEND=jax`: run as
    printed elsewhere, the program would pick TensorFlow (Keras's default),
    which a JAX-only runtime does not have.
    """
    prefix = ["KERAS_BACKEND=jax"] if _backend.in_use() == "jax" else []
    return " ".join([*prefix, "python -m tan_keras.train", *map(shlex.quote, argv)])


def in_process_runner(log_dir: Optional[str] = None) -> Runner:
    """A runner that trains with `program.run` in this process.

    TensorFlow loads once for the whole search.

    Args:
      log_dir: Where each run's printed output goes (<log_dir>/<name>.log),
        or None to leave it on this process's streams.

    Returns:
      runner(config, name): trains; raises RuntimeError (with the log's
      tail, or the refusal's message) if the run is refused or fails.
    """

    def run(config: TrainConfig, name: str) -> None:
        path = None if log_dir is None else os.path.join(log_dir, f"{name}.log")
        with contextlib.ExitStack() as stack:
            if path is not None:
                os.makedirs(log_dir, exist_ok=True)
                log = stack.enter_context(open(path, "w", encoding="utf-8"))
                stack.enter_context(contextlib.redirect_stdout(log))
                stack.enter_context(contextlib.redirect_stderr(log))
            try:
                program.run(config)
                failure = None
            except Exception as err:  # noqa: BLE001  (reported with the run's name)
                traceback.print_exc()
                failure = err
        if failure is not None:
            tail = ""
            if path is not None:
                with open(path, encoding="utf-8") as f:
                    tail = "".join(f.readlines()[-15:])
            command = command_line(train_flags.to_argv(_given(config)))
            raise RuntimeError(f"{command} failed: {failure}\n{tail}") from failure

    return run


def _given(config: TrainConfig) -> Dict[str, Any]:
    defaults = TrainConfig()
    return {
        name: getattr(config, name)
        for name in train_flags.NAMES
        if getattr(config, name) != getattr(defaults, name)
    }


def check_command(argv: List[str], runner: Runner) -> None:
    """Checks a printed command: its flags parse back and the program accepts them.

    The flags are parsed as `tan_keras.train` would parse them, then run
    with dry_run (validated, privacy plan printed, nothing trained or
    written).

    Raises:
      RuntimeError: if tan_keras.train refuses the flags.
    """
    try:
        settings = train_flags.parse(argv)
    except ValueError as err:
        raise RuntimeError(f"{command_line(argv)} is refused: {err}") from None
    runner(TrainConfig(**{**settings, "dry_run": True}), "final_dry_run")


def run_search(spec: SearchSpec, runner: Runner, log: Callable[[str], None] = print):
    """Trains every (config, batch size, seed) not finished yet.

    Args:
      spec: The search.
      runner: Trains one `TrainConfig` (see `in_process_runner`).
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
        settings = simulation_settings(spec, config, batch_size, seed)
        model_dir = run_dir(spec, config, batch_size, seed)
        metrics_path = os.path.join(model_dir, METRICS_FILE)
        name = run_name(config, batch_size, seed)
        if os.path.exists(metrics_path):
            _check_finished_run(spec, model_dir, settings, name)
            skipped += 1
            log(f"[{i}/{len(jobs)}] skipped (finished): {name}")
        else:
            resume = _prepare_model_dir(model_dir)
            log(f"[{i}/{len(jobs)}] {'resuming' if resume else 'training'}: {name}")
            runner(TrainConfig(**settings, resume=resume), name)
            if not os.path.exists(metrics_path):
                raise RuntimeError(f"run {name} wrote no {metrics_path}")
            trained += 1
        with open(metrics_path, encoding="utf-8") as f:
            metrics = json.load(f)
        if metrics.get(spec.metric) is None:
            raise _validate.invalid("metric", f"a key with a value in {metrics_path}", spec.metric)
        records.append({**metrics, "config": config, "run": name, "seed": seed})
    return records, trained, skipped


def _check_finished_run(
    spec: SearchSpec, model_dir: str, settings: Dict[str, Any], name: str
) -> None:
    """Refuses to reuse a finished run trained with other run-defining settings.

    Run names hold the grid point, B and the seed only: a run of an earlier
    search in the same --output_dir with other --train_flags, or on the
    private set where this search holds out a tuning split, would otherwise
    be ranked as this search's, and its coverage statement would be false.
    """
    path = os.path.join(model_dir, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        raise _validate.invalid(
            "output_dir",
            "a new directory, or one holding this search's runs",
            spec.output_dir,
            f"Finished run {name} has no readable {path}: how it was trained is unknown",
        ) from None
    differences = TrainConfig(**settings).differences(saved)
    if differences:
        given = ", ".join(f"--{k}={v}" for k, v in differences.items())
        raise _validate.invalid(
            "output_dir",
            "a new directory, or one holding this search's runs",
            spec.output_dir,
            f"Finished run {name} was trained with {given}, not as this search asks",
        )


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
