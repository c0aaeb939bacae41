"""The training program's command-line flags, typed, on any absl FlagValues.

`define` adds the flags of `python -m tan_keras.train` to a FlagValues: the
program's global one, or a private one that parses flag text without
touching the process's flags (the search parses its --train_flags and checks
its final command this way). Each flag holds a typed value checked by the
same `train_config.FIELD_CHECKS` rule as `TrainConfig`, so a bad value is
refused at parse time with the package's one-line message naming the flag,
its range and the value. `to_argv` renders typed settings back as flags
(floats exactly), so a printed command means what the program ran.
"""

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

from absl import flags

from tan_keras import _cli
from tan_keras.training.train_config import (
    DEFAULT_DELTA,
    FIELD_CHECKS,
    FROM_RECIPE,
    RECIPES,
    TrainConfig,
)

_D = TrainConfig.__dataclass_fields__

# name -> (type, help). Types: int, float, str, bool; "choice" is a str
# checked against its list; None-able numbers take "none" where it means off.
_FLAGS = {
    "dataset": (str, "digits | cifar10 | cifar100 | imagenet2012."),
    "data_dir": (str, "tfds data directory (default ~/tensorflow_datasets); never downloads."),
    "model": (str, "small_cnn | wrn16_4 (any wrn<depth>_<width>) | nf_resnet50."),
    "batch_size": (int, "B: expected (Poisson) batch size, integer in [1, N]."),
    "physical_batch_size": (
        int,
        "P: rows per micro-batch (memory); default B + 4 sqrt(B(1-q)), capped at N.",
    ),
    "steps": (int, "S: noisy updates, integer >= 1."),
    "augmult": (int, "K: augmented views per example, integer >= 1."),
    "augment": (str, "Augmentation policy none | digits | cifar | imagenet; default by dataset."),
    "lr": (float, "SGD learning rate, > 0."),
    "momentum": (float, "SGD momentum in [0, 1)."),
    "ema_decay": (
        float,
        "EMA decay of the weights in [0, 1) (warm-up min(d, (1+t)/(10+t))), or none.",
    ),
    "l2_norm_clip": (float, "C: per-example clip norm, > 0."),
    "delta": (
        float,
        "Target delta in (0, 1); default "
        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_DELTA.items())
        + ".",
    ),
    "target_eps": (
        float,
        "Epsilon to calibrate sigma for (never exceeded); 8 when no noise flag is given.",
    ),
    "noise_multiplier": (float, "sigma >= 0 instead of --target_eps (0: NOT private)."),
    "ref_batch_size": (
        int,
        "Simulation: B_ref of the private run to simulate (with --ref_noise_multiplier).",
    ),
    "ref_noise_multiplier": (
        float,
        "Simulation: sigma_ref; this run uses sigma = sigma_ref * B / B_ref (NOT private).",
    ),
    "accountant": (str, "rdp | pld."),
    "model_dir": (
        str,
        "Checkpoints, TensorBoard logs, metrics; must be new or empty unless --resume. "
        "Default: runs/<dataset>_<model>_<time>_<pid>.",
    ),
    "resume": (bool, "Continue the run saved in --model_dir from its latest checkpoint."),
    "checkpoint_every": (int, "Checkpoint period in noisy updates."),
    "metrics_json": (str, "Final metrics file; default <model_dir>/metrics.json."),
    "seed": (
        int,
        "Seed of model initialisation and augmentations, >= 0. The Poisson batches stay "
        "secret (OS entropy) unless --noise_seed is given.",
    ),
    "noise_seed": (
        int,
        "DEBUG ONLY: seeds the DP noise and the Poisson sampling; the run is NOT private.",
    ),
    "test_augmult": (int, "Test-time augmentation: majority vote over this many views (>= 2)."),
    "eval_every": (int, "Evaluate the test set every this many updates (optional)."),
    "jit_compile": (bool, "Compile the train step with XLA."),
    "examples_per_chunk": (
        int,
        "Per-example gradients held in memory at once: auto (chunks of <= 256 MiB of "
        "gradients), none (the whole micro-batch) or an integer >= 1.",
    ),
    "dry_run": (bool, "Validate the flags, print the privacy plan and exit; writes nothing."),
    "delete_checkpoints": (
        bool,
        "Delete the run's checkpoints (they hold the noise and sampling keys) once it "
        "finished and wrote its metrics.",
    ),
    "strategy": (
        str,
        "tf.distribute strategy: default (one device) | mirrored (all local GPUs, or CPU) | "
        "multiworker | tpu.",
    ),
    "tpu": (str, "With --strategy=tpu: TPU name or grpc:// address ('' or local on a TPU VM)."),
    "sampling_key_file": (
        str,
        "With --strategy=multiworker: file with the secret 64-bit sampling key shared by "
        "all workers (every worker must draw the same Poisson batches).",
    ),
    "tuning_examples": (
        int,
        "Hold out this many training examples as a tuning split (a uniformly random "
        "subset drawn from --tuning_split_seed): the run trains on the other N - n "
        "(the private set) and its guarantee covers exactly them, or on the n with "
        "--train_on=tuning. Default: no split.",
    ),
    "tuning_split_seed": (int, "Public seed of the tuning split's draw, >= 0."),
    "train_on": (
        str,
        "private (the training set minus any tuning split) | tuning (the split "
        "--tuning_examples holds out; for the search's simulations).",
    ),
    "ref_dataset_size": (
        int,
        "Simulation on other data than the private run's (a public proxy): N of the "
        "private run, for its reference epsilon. Default: this run's N (or the private "
        "part of the split with --train_on=tuning).",
    ),
    "release": (
        str,
        "all: also print and log the training statistics computed WITHOUT noise on the "
        "private examples (loss, accuracy, grad_norm, clipped_fraction, "
        "nonfinite_examples; NOT covered by epsilon) | private: release only what "
        "epsilon covers (noisy weights, test-set evaluations, privacy numbers).",
    ),
    "clipped_fraction_std": (
        float,
        "Also release the fraction of clipped examples privately (to choose C), logged as "
        "noisy_clipped_fraction: per step, the count plus Gaussian noise of std s*B, over "
        "B; its std is s, e.g. 0.05. Accounted with the updates (epsilon covers it).",
    ),
}
# Words a number flag takes for a non-number setting.
_WORDS = {
    "ema_decay": {"none": None},
    "examples_per_chunk": {"auto": "auto", "none": None},
    "physical_batch_size": {"auto": None},
}

NAMES = tuple(_FLAGS)


def define(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines every `tan_keras.train` flag on `flag_values`.

    Args:
      flag_values: The FlagValues to add them to (the global one by default).
    """
    for name, (kind, help_text) in _FLAGS.items():
        default = _D[name].default
        if default is FROM_RECIPE:
            # Not given: the dataset's recipe decides (TrainConfig fills it in).
            default = None
            help_text += (
                " Default by dataset: "
                + ", ".join(
                    f"{dataset} {_recipe_text(name, recipe[name])}"
                    for dataset, recipe in RECIPES.items()
                )
                + "."
            )
        if kind is bool:
            flags.DEFINE_bool(name, default, help_text, flag_values=flag_values)
        else:
            _cli.define_checked(
                name,
                default,
                help_text,
                kind,
                check=FIELD_CHECKS.get(name),
                words=_WORDS.get(name),
                flag_values=flag_values,
            )


def settings(flag_values: flags.FlagValues, given_only: bool = False) -> Dict[str, Any]:
    """The typed settings held by parsed flags.

    Args:
      flag_values: Parsed FlagValues on which `define` was called.
      given_only: Only the flags present on the command line.

    Returns:
      {setting: value}, ready for `TrainConfig(**...)`.
    """
    return {
        name: flag_values[name].value
        for name in NAMES
        # A recipe setting not given stays out: TrainConfig takes the
        # dataset's recipe (the flag's own None means something else).
        if flag_values[name].present or not (given_only or _D[name].default is FROM_RECIPE)
    }


def parse(argv: Sequence[str]) -> Dict[str, Any]:
    """Parses `tan_keras.train` flags without touching the process's flags.

    Args:
      argv: Flags only (no program name), e.g. ["--lr=2", "--model=wrn16_4"];
        --flagfile works as on the command line.

    Returns:
      The typed settings of the flags given, ready for `TrainConfig(**...)`.

    Raises:
      ValueError: on an unknown flag, a positional argument or a bad value,
        with the one-line message the command line prints.
    """
    flag_values = flags.FlagValues()
    define(flag_values)
    try:
        rest = flag_values(["tan_keras.train", *argv])
    except flags.Error as err:
        raise ValueError(_cli.flag_error_message(err)) from None
    if len(rest) > 1:
        raise ValueError(f"unexpected positional arguments: {' '.join(rest[1:])!r}")
    return settings(flag_values, given_only=True)


def to_argv(values: Mapping[str, Any]) -> List[str]:
    """Typed settings as `tan_keras.train` flags that parse back to them exactly.

    Args:
      values: {setting: value}; None is written only where it has a word
        ("none"), else left out (the flag's default is "not given").

    Returns:
      ["--name=value", ...] in the order given.

    Raises:
      ValueError: on a name that is not a flag.
    """
    argv = []
    for name, value in values.items():
        if name not in _FLAGS:
            raise ValueError(f"Invalid setting {name!r}: not a tan_keras.train flag")
        if isinstance(value, bool):
            argv.append(f"--{name}" if value else f"--no{name}")
        elif value is None:
            word = _word_for(name, None)
            if word is not None:
                argv.append(f"--{name}={word}")
        else:
            argv.append(f"--{name}={_text(value)}")
    return argv


def _recipe_text(name: str, value: Any) -> str:
    word = _word_for(name, value) if value is None else None
    return word if word is not None else _text(value)


def _word_for(name: str, value: Any) -> Optional[str]:
    for word, meaning in _WORDS.get(name, {}).items():
        if meaning is value:
            return word
    return None


def _text(value: Any) -> str:
    if isinstance(value, float):
        # repr round-trips a float exactly (:g keeps 6 digits); 4.0 -> "4".
        if math.isfinite(value) and value.is_integer() and abs(value) < 2**53:
            return str(int(value))
        return repr(value)
    return str(value)
