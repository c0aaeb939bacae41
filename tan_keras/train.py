r"""Trains a model with DP-SGD, the TAN way: `python -m tan_keras.train`.

With no flags: small_cnn on scikit-learn's digits (bundled, no download) at
epsilon 8, delta 1e-5, in a few minutes on 2 CPU cores. The paper's recipes
are flagfiles:

  python -m tan_keras.train --flagfile=flags/cifar10_wrn16_4.cfg
  python -m tan_keras.train --flagfile=flags/cifar10_wrn16_4_sim256.cfg

The program validates every flag before any work (bad values and
combinations exit with status 2 and one line on stderr, writing nothing),
prints the privacy plan (epsilon, delta, sigma, q, eta, eps_TAN, sigma/B, S,
gradient evaluations; in simulation mode the reference run's numbers and a
NOT PRIVATE mark), trains with Poisson sampling until exactly S noisy
updates, checkpoints to --model_dir (--resume continues a killed run with the
same step count and epsilon as an uninterrupted one), evaluates the final and
EMA weights and writes a flat metrics JSON.
"""

import os

# Before TensorFlow loads: keep its C++ start-up chatter off stderr, where
# one-line errors go.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dataclasses  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402

from tan_keras import _cli, _validate  # noqa: E402
from tan_keras.privacy.cli import parse_number  # noqa: E402
from tan_keras.train_config import DEFAULT_DELTA, TrainConfig  # noqa: E402

_D = {f.name: f.default for f in dataclasses.fields(TrainConfig)}

# Numbers are read as text and converted by parse_number so that a bad value
# ("abc", 2.5 steps) reaches the package's validators and gets their one-line
# message naming the flag and its range, not absl's.
_DATASET = flags.DEFINE_string(
    "dataset", _D["dataset"], "digits | cifar10 | cifar100 | imagenet2012."
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "tfds data directory (default ~/tensorflow_datasets); never downloads."
)
_MODEL = flags.DEFINE_string(
    "model", _D["model"], "small_cnn | wrn16_4 (any wrn<depth>_<width>) | nf_resnet50."
)
_BATCH_SIZE = flags.DEFINE_string(
    "batch_size", str(_D["batch_size"]), "B: expected (Poisson) batch size, integer in [1, N]."
)
_PHYSICAL_BATCH_SIZE = flags.DEFINE_string(
    "physical_batch_size",
    None,
    "P: rows per micro-batch (memory); default B + 4 sqrt(B(1-q)), capped at N.",
)
_STEPS = flags.DEFINE_string("steps", str(_D["steps"]), "S: noisy updates, integer >= 1.")
_AUGMULT = flags.DEFINE_string(
    "augmult", str(_D["augmult"]), "K: augmented views per example, integer >= 1."
)
_AUGMENT = flags.DEFINE_string(
    "augment",
    None,
    "Augmentation policy none | digits | cifar | imagenet; default by dataset.",
)
_LR = flags.DEFINE_string("lr", str(_D["lr"]), "SGD learning rate, > 0.")
_MOMENTUM = flags.DEFINE_string("momentum", str(_D["momentum"]), "SGD momentum in [0, 1).")
_EMA_DECAY = flags.DEFINE_string(
    "ema_decay",
    str(_D["ema_decay"]),
    "EMA decay of the weights in [0, 1) (warm-up min(d, (1+t)/(10+t))), or none.",
)
_L2_NORM_CLIP = flags.DEFINE_string(
    "l2_norm_clip", str(_D["l2_norm_clip"]), "C: per-example clip norm, > 0."
)
_DELTA = flags.DEFINE_string(
    "delta",
    None,
    "Target delta in (0, 1); default "
    + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_DELTA.items())
    + ".",
)
_TARGET_EPS = flags.DEFINE_string(
    "target_eps",
    None,
    "Epsilon to calibrate sigma for (never exceeded); 8 when no noise flag is given.",
)
_NOISE_MULTIPLIER = flags.DEFINE_string(
    "noise_multiplier", None, "sigma >= 0 instead of --target_eps (0: NOT private)."
)
_REF_BATCH_SIZE = flags.DEFINE_string(
    "ref_batch_size",
    None,
    "Simulation: B_ref of the private run to simulate (with --ref_noise_multiplier).",
)
_REF_NOISE_MULTIPLIER = flags.DEFINE_string(
    "ref_noise_multiplier",
    None,
    "Simulation: sigma_ref; this run uses sigma = sigma_ref * B / B_ref (NOT private).",
)
_ACCOUNTANT = flags.DEFINE_string("accountant", _D["accountant"], "rdp | pld.")
_MODEL_DIR = flags.DEFINE_string(
    "model_dir",
    None,
    "Checkpoints, TensorBoard logs, metrics; must be new or empty unless --resume. "
    "Default: runs/<dataset>_<model>_<time>_<pid>.",
)
_RESUME = flags.DEFINE_bool(
    "resume", False, "Continue the run saved in --model_dir from its latest checkpoint."
)
_CHECKPOINT_EVERY = flags.DEFINE_string(
    "checkpoint_every", str(_D["checkpoint_every"]), "Checkpoint period in noisy updates."
)
_METRICS_JSON = flags.DEFINE_string(
    "metrics_json", None, "Final metrics file; default <model_dir>/metrics.json."
)
_SEED = flags.DEFINE_string(
    "seed",
    str(_D["seed"]),
    "Seed of model initialisation and augmentations, >= 0. The Poisson batches stay "
    "secret (OS entropy) unless --noise_seed is given.",
)
_NOISE_SEED = flags.DEFINE_string(
    "noise_seed",
    None,
    "DEBUG ONLY: seeds the DP noise and the Poisson sampling; the run is NOT private.",
)
_TEST_AUGMULT = flags.DEFINE_string(
    "test_augmult", None, "Test-time augmentation: majority vote over this many views (>= 2)."
)
_EVAL_EVERY = flags.DEFINE_string(
    "eval_every", None, "Evaluate the test set every this many updates (optional)."
)
_JIT_COMPILE = flags.DEFINE_bool("jit_compile", False, "Compile the train step with XLA.")
_EXAMPLES_PER_CHUNK = flags.DEFINE_string(
    "examples_per_chunk",
    "auto",
    "Per-example gradients held in memory at once: auto (chunks of <= 256 MiB of "
    "gradients), none (the whole micro-batch) or an integer >= 1.",
)
_STRATEGY = flags.DEFINE_string(
    "strategy",
    _D["strategy"],
    "tf.distribute strategy: default (one device) | mirrored (all local GPUs, or CPU) | tpu.",
)
_TPU = flags.DEFINE_string(
    "tpu", None, "With --strategy=tpu: TPU name or grpc:// address ('' or local on a TPU VM)."
)
_SAMPLING_KEY_FILE = flags.DEFINE_string(
    "sampling_key_file",
    None,
    "With --strategy=multiworker: file with the secret 64-bit sampling key shared by "
    "all workers (every worker must draw the same Poisson batches).",
)
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Validate the flags, print the privacy plan and exit; writes nothing."
)


def main(argv):
    start = time.monotonic()
    if len(argv) > 1:
        _cli.fail(f"unexpected positional arguments: {' '.join(argv[1:])!r}")
    try:
        train(config_from_flags(), start)
    except ValueError as err:
        # Bad flags, unavailable datasets and refused checkpoints (all
        # ValueErrors) are reported before anything is written.
        _cli.fail(str(err))


def _chunk_setting(value: str):
    if value.lower() in ("auto", "none"):
        return None if value.lower() == "none" else "auto"
    return parse_number(value)


def config_from_flags() -> TrainConfig:
    """Reads every flag once into a validated `TrainConfig`.

    Returns:
      The run's settings.

    Raises:
      ValueError: naming the flag, on a bad value or combination.
    """
    number = parse_number
    ema_decay = _EMA_DECAY.value
    return TrainConfig(
        dataset=_DATASET.value,
        data_dir=_DATA_DIR.value,
        model=_MODEL.value,
        batch_size=number(_BATCH_SIZE.value),
        physical_batch_size=number(_PHYSICAL_BATCH_SIZE.value),
        steps=number(_STEPS.value),
        augmult=number(_AUGMULT.value),
        augment=_AUGMENT.value,
        lr=number(_LR.value),
        momentum=number(_MOMENTUM.value),
        ema_decay=None if ema_decay.lower() == "none" else number(ema_decay),
        l2_norm_clip=number(_L2_NORM_CLIP.value),
        delta=number(_DELTA.value),
        target_eps=number(_TARGET_EPS.value),
        noise_multiplier=number(_NOISE_MULTIPLIER.value),
        ref_batch_size=number(_REF_BATCH_SIZE.value),
        ref_noise_multiplier=number(_REF_NOISE_MULTIPLIER.value),
        accountant=_ACCOUNTANT.value,
        model_dir=_MODEL_DIR.value,
        resume=_RESUME.value,
        checkpoint_every=number(_CHECKPOINT_EVERY.value),
        metrics_json=_METRICS_JSON.value,
        seed=number(_SEED.value),
        noise_seed=number(_NOISE_SEED.value),
        test_augmult=number(_TEST_AUGMULT.value),
        eval_every=number(_EVAL_EVERY.value),
        jit_compile=_JIT_COMPILE.value,
        examples_per_chunk=_chunk_setting(_EXAMPLES_PER_CHUNK.value),
        dry_run=_DRY_RUN.value,
        strategy=_STRATEGY.value,
        tpu=_TPU.value,
        sampling_key_file=_SAMPLING_KEY_FILE.value,
    )


def train(config: TrainConfig, start: float) -> None:
    """The training program, top to bottom. A ValueError means "refused"."""
    # TensorFlow loads only after the cheap checks (train_config and
    # train_plan do not import it), so most bad flags fail in a second.
    from tan_keras import _startup, datasets, train_config, train_plan

    model_dir = config.model_dir or train_config.default_model_dir(config.dataset, config.model)
    worker = train_config.worker_index() if config.strategy == "multiworker" else 0
    if worker:
        # Workers other than the chief keep their own checkpoints, logs and
        # metrics (identical state: every worker applies the same updates).
        model_dir = os.path.join(model_dir, f"worker_{worker}")
    train_config.check_model_dir(model_dir, config)
    metrics_path = config.metrics_json or os.path.join(model_dir, train_config.METRICS_FILE)
    if os.path.isdir(metrics_path):
        raise _validate.invalid("metrics_json", "a file path, not a directory", metrics_path)
    data = datasets.load_dataset(config.dataset, config.data_dir)
    plan = train_plan.plan_privacy(config, data.size)

    _startup.load_tensorflow()
    from tan_keras import augment, sampling, train_data, train_lib

    augmenter = None
    if config.augment != "none":
        try:
            augmenter = augment.make_augmenter(config.augment, data.input_shape, seed=config.seed)
        except ValueError as err:
            raise _validate.invalid(
                "augment",
                f"a policy that fits {config.dataset} images of shape {data.input_shape}",
                config.augment,
                str(err),
            ) from None
    print(train_plan.format_plan(plan, config.dataset), flush=True)
    if config.dry_run:
        return

    strategy = train_lib.make_strategy(config.strategy, config.tpu)
    with strategy.scope():
        model = train_lib.build_model(config, plan, data.input_shape, data.num_classes)
    sampler = sampling.PoissonSampler(
        plan.dataset_size,
        plan.batch_size,
        physical_batch_size=train_lib.physical_batch_size(
            config.physical_batch_size,
            plan.batch_size,
            plan.dataset_size,
            strategy.num_replicas_in_sync,
        ),
        seed=config.noise_seed,
        secret_key=(
            train_config.read_sampling_key(config.sampling_key_file)
            if config.sampling_key_file and config.noise_seed is None
            else None
        ),
    )
    # Restores on --resume (refusing corrupted or foreign checkpoints) before
    # writing anything to model_dir.
    checkpoint = train_lib.restore_or_start(model_dir, config, model, sampler)
    print(f"model_dir: {model_dir}", flush=True)

    # From here on, errors are bugs or crashes, not refusals: let them show.
    try:
        train_ds = train_data.train_dataset(
            data.train_x,
            data.train_y,
            sampler,
            config.augmult,
            augmenter,
            per_host=strategy if config.strategy == "multiworker" else None,
        )
        test_ds = train_data.test_dataset(data.test_x, data.test_y, sampler.physical_batch_size)
        dp_steps = train_lib.fit(
            model, train_ds, sampler, checkpoint, plan, config, model_dir, test_ds
        )
        accuracies = train_lib.evaluate(model, test_ds, config.test_augmult, augmenter)
        metrics = train_lib.final_metrics(
            config, plan, dp_steps, accuracies, time.monotonic() - start, model_dir
        )
        train_lib.write_metrics(metrics_path, metrics)
    except ValueError as err:
        raise RuntimeError(str(err)) from err
    for line in train_lib.describe_metrics(metrics):
        print(line)
    print(f"metrics: {metrics_path}", flush=True)


def cli(argv=None):
    """Runs the program as from the command line (exits via SystemExit).

    Args:
      argv: Full argument list including the program name; None uses sys.argv.
    """
    app.run(main, argv=argv, flags_parser=_cli.parse_flags)


if __name__ == "__main__":
    cli()
