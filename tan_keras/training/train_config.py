"""The settings of one training run, validated before any work is done.

`TrainConfig` holds every flag of `python -m tan_keras.train` as a plain
value. Building it checks each value and every combination that needs no data
(conflicting noise flags, augmentation multiplicity without augmentations,
--resume without a model_dir, ...) and fills in the defaults that depend on
the dataset (delta, augmentation policy). Checks that need the dataset size N
(B <= N, calibration) live in `train_plan`.

The defaults are the CPU recipe: small_cnn on scikit-learn's digits
(N = 1437) at epsilon 8, a few minutes on 2 CPU cores. Another dataset takes
its own recipe (`RECIPES`: the TAN paper's for CIFAR and ImageNet) for every
setting the run does not give.
"""

import dataclasses
import json
import os
import re
import time
from typing import Any, Callable, Dict, Optional

from tan_keras import _backend, _private_files, _validate
from tan_keras.data.datasets import DATASET_NAMES
from tan_keras.data.policies import DEFAULT_POLICY, POLICIES
from tan_keras.data.splits import PARTS
from tan_keras.models.names import check_model_name
from tan_keras.privacy import plan
from tan_keras.privacy.accounting import ACCOUNTANTS

# tf.distribute strategies the program can run under (see README, "Running on
# TPU / multiple GPUs"). Multi-worker training needs every host to draw the
# same Poisson batches: from a shared secret key (--sampling_key_file).
STRATEGIES = ("default", "mirrored", "multiworker", "tpu")

# What a run releases (--release): "all" also prints and logs the training
# statistics computed on the private examples without noise
# (NOISELESS_STATISTICS); "private" releases only what the guarantee covers.
RELEASES = ("all", "private")
NOISELESS_STATISTICS = ("loss", "accuracy", "grad_norm", "clipped_fraction", "nonfinite_examples")

# Layout of a model_dir.
CONFIG_FILE = "train_config.json"
CHECKPOINT_SUBDIR = "checkpoints"
TENSORBOARD_SUBDIR = "tensorboard"
METRICS_FILE = "metrics.json"


class _FromRecipe:
    """The default of a setting taken from its dataset's recipe (`RECIPES`)."""

    def __repr__(self) -> str:
        return "by dataset"


FROM_RECIPE = _FromRecipe()

# Each dataset's recipe: what a run takes for every one of these settings it
# does not set. CIFAR-10 and ImageNet: the TAN paper's private runs
# (docs/tan-method.md section 5; flags/ holds them as flagfiles); CIFAR-100
# takes CIFAR-10's (the paper has no CIFAR-100 run); digits: the CPU recipe.
# physical_batch_size sets memory only (None: B + 4 std of the batch size).
RECIPES: Dict[str, Dict[str, Any]] = {
    "digits": dict(
        model="small_cnn",
        batch_size=512,
        physical_batch_size=None,
        steps=200,
        augmult=4,
        lr=4.0,
        momentum=0.0,
        ema_decay=0.99,
        l2_norm_clip=1.0,
    ),
    "cifar10": dict(
        model="wrn16_4",
        batch_size=4096,
        physical_batch_size=256,
        steps=2500,
        augmult=16,
        lr=4.0,
        momentum=0.0,
        ema_decay=0.9999,
        l2_norm_clip=1.0,
    ),
    "imagenet2012": dict(
        model="nf_resnet50",
        batch_size=32768,
        physical_batch_size=32,
        steps=18000,
        augmult=8,
        lr=32.0,
        momentum=0.0,
        ema_decay=0.999,
        l2_norm_clip=1.0,
    ),
}
RECIPES["cifar100"] = dict(RECIPES["cifar10"])

# Epsilon targeted when none of --target_eps, --noise_multiplier or the
# simulation flags is given.
DEFAULT_TARGET_EPS = 8.0

# delta per dataset. CIFAR and ImageNet: the TAN paper's values. digits
# (N = 1437): 1e-5, 70x below 1/N (the usual rule is delta << 1/N: releasing
# one random example in the clear already has delta = 1/N).
DEFAULT_DELTA = {
    "digits": 1e-5,
    "cifar10": 1e-5,
    "cifar100": 1e-5,
    "imagenet2012": 8e-7,
}

# Flags that define what a run computes. Resuming a run with any of them
# changed would silently continue another experiment, so it is refused.
RUN_DEFINING_FLAGS = (
    "dataset",
    "model",
    "batch_size",
    "steps",
    "augmult",
    "augment",
    "lr",
    "momentum",
    "ema_decay",
    "l2_norm_clip",
    "delta",
    "target_eps",
    "noise_multiplier",
    "ref_batch_size",
    "ref_noise_multiplier",
    "accountant",
    "seed",
    "noise_seed",
    "tuning_examples",
    "tuning_split_seed",
    "train_on",
    "ref_dataset_size",
    "clipped_fraction_std",
)


def _unit_interval(name: str) -> Callable[[Any], float]:
    return lambda v: _validate.real(name, v, low=0.0, high=1.0, high_inclusive=False)


# The check of each setting on its own (type and range), shared by
# `TrainConfig` and the typed command-line flags: field -> value -> value.
# None ("not given") skips the check, except for the fields in _REQUIRED.
FIELD_CHECKS: Dict[str, Callable[[Any], Any]] = {
    "dataset": lambda v: _validate.one_of("dataset", v, DATASET_NAMES),
    "model": check_model_name,
    "batch_size": lambda v: _validate.positive_int("batch_size", v),
    "physical_batch_size": lambda v: _validate.positive_int("physical_batch_size", v),
    "steps": lambda v: _validate.positive_int("steps", v),
    "augmult": lambda v: _validate.positive_int("augmult", v),
    "augment": lambda v: _validate.one_of("augment", v, POLICIES),
    "lr": lambda v: _validate.positive("lr", v),
    "momentum": _unit_interval("momentum"),
    "ema_decay": _unit_interval("ema_decay"),
    "l2_norm_clip": lambda v: _validate.positive("l2_norm_clip", v),
    "examples_per_chunk": _validate.examples_per_chunk,
    "delta": lambda v: _validate.delta("delta", v),
    "target_eps": lambda v: _validate.positive("target_eps", v),
    "noise_multiplier": lambda v: _validate.non_negative("noise_multiplier", v),
    "ref_batch_size": lambda v: _validate.positive_int("ref_batch_size", v),
    "ref_noise_multiplier": lambda v: _validate.positive("ref_noise_multiplier", v),
    "accountant": lambda v: _validate.one_of("accountant", v, ACCOUNTANTS),
    "checkpoint_every": lambda v: _validate.positive_int("checkpoint_every", v),
    "seed": lambda v: _validate.integer("seed", v, low=0),
    "noise_seed": lambda v: _validate.integer("noise_seed", v, low=0),
    "test_augmult": lambda v: _validate.integer(
        "test_augmult",
        v,
        low=2,
        hint="Test-time augmentation votes over >= 2 views; leave it unset "
        "to evaluate the plain test images only",
    ),
    "eval_every": lambda v: _validate.positive_int("eval_every", v),
    "strategy": lambda v: _validate.one_of("strategy", v, STRATEGIES),
    "tuning_examples": lambda v: _validate.positive_int("tuning_examples", v),
    "tuning_split_seed": lambda v: _validate.integer("tuning_split_seed", v, low=0),
    "train_on": lambda v: _validate.one_of("train_on", v, PARTS),
    "ref_dataset_size": lambda v: _validate.positive_int("ref_dataset_size", v),
    "release": lambda v: _validate.one_of("release", v, RELEASES),
    "clipped_fraction_std": lambda v: _validate.positive("clipped_fraction_std", v),
}
# Settings that are never "not given" (examples_per_chunk=None means "none").
_REQUIRED = frozenset(
    "dataset model batch_size steps augmult lr momentum l2_norm_clip accountant "
    "checkpoint_every seed strategy tuning_split_seed train_on release".split()
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """All settings of a training run; see `python -m tan_keras.train --help`.

    Numbers may be given as Python numbers or as the numbers parsed from
    flags; a value of the wrong type or out of range raises the package's
    standard `ValueError` naming the flag. `None` means "not given": the
    dataset-dependent defaults (delta, augment) and the default privacy target
    (epsilon 8 when no noise flag is given) are filled in on construction, and
    so are the settings left at `FROM_RECIPE` (model, batch size, steps,
    views, optimizer, EMA, clip norm) from the dataset's `RECIPES` entry.

    Raises:
      ValueError: on an invalid value or a nonsensical combination.
    """

    dataset: str = "digits"
    data_dir: Optional[str] = None
    model: Any = FROM_RECIPE
    batch_size: Any = FROM_RECIPE
    physical_batch_size: Any = FROM_RECIPE
    steps: Any = FROM_RECIPE
    augmult: Any = FROM_RECIPE
    augment: Optional[str] = None
    lr: Any = FROM_RECIPE
    momentum: Any = FROM_RECIPE
    ema_decay: Any = FROM_RECIPE
    l2_norm_clip: Any = FROM_RECIPE
    delta: Any = None
    target_eps: Any = None
    noise_multiplier: Any = None
    ref_batch_size: Any = None
    ref_noise_multiplier: Any = None
    accountant: str = "rdp"
    model_dir: Optional[str] = None
    resume: bool = False
    checkpoint_every: Any = 100
    metrics_json: Optional[str] = None
    seed: Any = 0
    noise_seed: Any = None
    test_augmult: Any = None
    eval_every: Any = None
    jit_compile: bool = False
    examples_per_chunk: Any = "auto"
    dry_run: bool = False
    delete_checkpoints: bool = False
    strategy: str = "default"
    tpu: Optional[str] = None
    sampling_key_file: Optional[str] = None
    tuning_examples: Any = None
    tuning_split_seed: Any = 0
    train_on: str = "private"
    ref_dataset_size: Any = None
    release: str = "all"
    clipped_fraction_std: Any = None

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "dataset", FIELD_CHECKS["dataset"](self.dataset))
        for name, value in RECIPES[self.dataset].items():
            if getattr(self, name) is FROM_RECIPE:
                set_(self, name, value)
        for name, check in FIELD_CHECKS.items():
            value = getattr(self, name)
            if value is not None or name in _REQUIRED:
                set_(self, name, check(value))
        if self.augment is None:
            set_(self, "augment", DEFAULT_POLICY[self.dataset])
        if self.augmult > 1 and self.augment == "none":
            raise _validate.invalid(
                "augmult",
                "1 with --augment=none",
                self.augmult,
                "K identical views average to the gradient of one view: K times the "
                "compute for nothing. Choose an augmentation policy or --augmult=1",
            )
        if self.delta is None:
            set_(self, "delta", DEFAULT_DELTA[self.dataset])
        self._check_noise_flags()
        if self.resume and not self.model_dir:
            raise _validate.invalid(
                "model_dir",
                "the directory of the run to continue when --resume is given",
                self.model_dir,
            )
        if self.test_augmult is not None and self.augment == "none":
            raise _validate.invalid(
                "test_augmult",
                "unset with --augment=none (identical views cannot vote)",
                self.test_augmult,
            )
        if self.tpu is not None and self.strategy != "tpu":
            raise _validate.invalid("tpu", "unset unless --strategy=tpu", self.tpu)
        self._check_multiworker()
        self._check_tuning_split()

    def _check_tuning_split(self):
        if self.tuning_split_seed != 0 and self.tuning_examples is None:
            raise _validate.invalid(
                "tuning_split_seed",
                "0 (unset) unless --tuning_examples holds out a tuning split",
                self.tuning_split_seed,
            )
        if self.train_on == "tuning" and self.tuning_examples is None:
            raise _validate.invalid(
                "train_on",
                "'private' unless --tuning_examples holds out a tuning split",
                self.train_on,
            )
        if self.ref_dataset_size is None:
            return
        if self.noise_mode != "simulation":
            raise _validate.invalid(
                "ref_dataset_size",
                "unset unless --ref_batch_size and --ref_noise_multiplier simulate a run",
                self.ref_dataset_size,
            )
        if self.train_on == "tuning":
            raise _validate.invalid(
                "ref_dataset_size",
                "unset with --train_on=tuning (the private run is the rest of the split)",
                self.ref_dataset_size,
            )

    def _check_multiworker(self):
        if self.strategy != "multiworker":
            if self.sampling_key_file is not None:
                raise _validate.invalid(
                    "sampling_key_file",
                    "unset unless --strategy=multiworker",
                    self.sampling_key_file,
                )
            return
        if self.noise_seed is None:
            if self.sampling_key_file is None:
                raise _validate.invalid(
                    "sampling_key_file",
                    "a file holding a secret 64-bit key, the same on every worker, with "
                    "--strategy=multiworker (create it once: python -c 'import secrets; "
                    "print(secrets.randbits(64))' > key under umask 077, copy it privately to "
                    "each host)",
                    None,
                )
            read_sampling_key(self.sampling_key_file)

    def _check_noise_flags(self):
        """Exactly one way to set the noise (`plan.noise_mode`); 8 by default."""
        mode = plan.noise_mode(
            target_eps=self.target_eps,
            noise_multiplier=self.noise_multiplier,
            ref_batch_size=self.ref_batch_size,
            ref_noise_multiplier=self.ref_noise_multiplier,
            batch_size=self.batch_size,
        )
        if mode == "target_eps" and self.target_eps is None:
            object.__setattr__(self, "target_eps", DEFAULT_TARGET_EPS)

    @property
    def noise_mode(self) -> str:
        """How sigma is chosen: one of `plan.NOISE_MODES`."""
        return plan.noise_mode(
            target_eps=self.target_eps,
            noise_multiplier=self.noise_multiplier,
            ref_batch_size=self.ref_batch_size,
            ref_noise_multiplier=self.ref_noise_multiplier,
        )

    def to_dict(self) -> Dict[str, Any]:
        """The resolved settings as a JSON-ready dict (saved in model_dir)."""
        return dataclasses.asdict(self)

    def differences(self, saved: Dict[str, Any]) -> Dict[str, Any]:
        """Run-defining flags whose value differs from a saved run's.

        Args:
          saved: `to_dict()` of the run saved in model_dir.

        Returns:
          {flag: saved value} for each flag of `RUN_DEFINING_FLAGS` that differs.
        """
        mine = self.to_dict()
        return {
            name: saved.get(name)
            for name in RUN_DEFINING_FLAGS
            if name not in saved or saved[name] != mine[name]
        }


def read_sampling_key(path: str) -> int:
    """Reads the shared secret sampling key of a multi-worker run.

    Args:
      path: A file holding one integer in [0, 2^64) (decimal or 0x-hex).

    Returns:
      The key.

    Raises:
      ValueError: naming `sampling_key_file` if the file is missing or bad.
    """
    try:
        with open(path, encoding="utf-8") as f:
            key = int(f.read().strip(), 0)
    except (OSError, ValueError):
        raise _validate.invalid(
            "sampling_key_file", "a readable file holding one integer in [0, 2^64)", path
        ) from None
    if _private_files.readable_by_others(path):
        raise _validate.invalid(
            "sampling_key_file",
            "a file only its owner can read (mode 0600): whoever knows the key knows "
            "which examples every step sampled, and the amplification by sampling in "
            "the reported epsilon does not hold against them",
            path,
            f"Run `chmod 600 {path}` (and create keys with umask 077)",
        )
    if not 0 <= key < 2**64:
        raise _validate.invalid(
            "sampling_key_file", "a readable file holding one integer in [0, 2^64)", path
        )
    return key


def worker_index() -> int:
    """This process's worker index in a multi-worker cluster (TF_CONFIG), else 0."""
    try:
        task = json.loads(os.environ.get("TF_CONFIG", "{}")).get("task", {})
    except ValueError:
        return 0
    return int(task.get("index", 0)) if task.get("type", "worker") in ("worker", "chief") else 0


def default_model_dir(dataset: str, model: str) -> str:
    """A fresh directory name under ./runs/ (timestamp + pid: never reused).

    Args:
      dataset: Dataset name.
      model: Model name.

    Returns:
      A relative path such as runs/digits_small_cnn_20260101-120000_1234.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{dataset}_{model}_{stamp}_{os.getpid()}")


def check_model_dir(model_dir: str, config: TrainConfig) -> None:
    """Refuses to overwrite a run, or to resume something that is not there.

    Without --resume, model_dir must not exist or be empty: an existing run is
    never overwritten nor silently restarted at step 0. With --resume, it
    must hold a checkpoint, and the run-defining flags saved in
    train_config.json must equal this run's.

    Args:
      model_dir: The run directory.
      config: The run settings.

    Raises:
      ValueError: naming the flag to change.
      CheckpointError: if the checkpoint index or the saved settings are
        unreadable.
    """
    if os.path.exists(model_dir) and not os.path.isdir(model_dir):
        raise _validate.invalid("model_dir", "a directory path", model_dir)
    entries = os.listdir(model_dir) if os.path.isdir(model_dir) else []
    if config.strategy == "multiworker":
        # The other workers' own directories may appear at any time.
        entries = [e for e in entries if not re.fullmatch(r"worker_\d+", e)]
    non_empty = bool(entries)
    if not config.resume:
        if non_empty:
            raise _validate.invalid(
                "model_dir",
                "a new or empty directory",
                model_dir,
                "It already holds a run: pass --resume to continue it, or choose "
                "another --model_dir",
            )
        return
    if _backend.in_use() == "jax":
        _check_keras_checkpoint(model_dir)
    else:
        _check_tensorflow_checkpoint(model_dir)
    _check_saved_settings(model_dir, config)


def _check_keras_checkpoint(model_dir: str) -> None:
    """A JAX run's checkpoint: one Keras file of the private model (`jax_run`)."""
    path = os.path.join(model_dir, CHECKPOINT_SUBDIR, "latest.keras")
    if not os.path.isfile(path):
        raise _validate.invalid(
            "resume",
            f"a checkpoint to continue in model_dir ({path} is missing)",
            True,
            "Drop --resume to start a new run in an empty --model_dir",
        )


def _check_tensorflow_checkpoint(model_dir: str) -> None:
    """A TensorFlow run's checkpoint index, readable and not empty."""
    # TensorFlow only now: resuming needs it anyway.
    import tensorflow as tf

    from tan_keras.keras_dp.checkpointing import CheckpointError

    checkpoint_dir = os.path.join(model_dir, CHECKPOINT_SUBDIR)
    refusal = (
        "Refusing to start over at step 0 silently (that would under-report "
        "epsilon): delete model_dir to start a new run."
    )
    try:
        latest = tf.train.latest_checkpoint(checkpoint_dir)
    except (tf.errors.OpError, ValueError) as err:
        raise CheckpointError(
            f"Cannot read the checkpoint index in {checkpoint_dir!r} ({err}). {refusal}"
        ) from None
    if latest is None and os.path.isdir(checkpoint_dir) and os.listdir(checkpoint_dir):
        # tf.train.latest_checkpoint logs a garbled index and returns None.
        raise CheckpointError(
            f"{checkpoint_dir!r} holds files but no readable checkpoint index: the "
            f"checkpoint is corrupted. {refusal}"
        )
    if latest is None:
        raise _validate.invalid(
            "resume",
            f"a checkpoint to continue in model_dir ({checkpoint_dir} has none)",
            True,
            "Drop --resume to start a new run in an empty --model_dir",
        )


def _check_saved_settings(model_dir: str, config: TrainConfig) -> None:
    """The run-defining settings saved in model_dir equal `config`'s."""
    saved_path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.exists(saved_path):
        return  # The checkpoint's own DP fingerprint is still checked on restore.
    try:
        with open(saved_path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError) as err:
        raise _corrupted(f"Cannot read {saved_path!r} ({err}): model_dir is corrupted.") from None
    differences = config.differences(saved)
    if differences:
        name, value = next(iter(differences.items()))
        others = ", ".join(f"--{k}={v}" for k, v in list(differences.items())[1:])
        raise _validate.invalid(
            name,
            f"{value!r}, the value of the run saved in {model_dir}, when resuming it",
            getattr(config, name),
            f"Other saved values that differ: {others}" if others else "",
        )


def _corrupted(message: str) -> ValueError:
    """The error of a corrupted run directory: a `CheckpointError` on TensorFlow."""
    if _backend.in_use() == "jax":
        return ValueError(message)
    from tan_keras.keras_dp.checkpointing import CheckpointError

    return CheckpointError(message)
