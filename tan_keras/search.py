r"""Cheap hyper-parameter search for a private run: `python -m tan_keras.search`.

Tunes the non-privacy hyper-parameters of one private reference run
(--ref_batch_size, --ref_noise_multiplier, --steps) on simulations at a small
--batch_size with sigma = ref_noise_multiplier * batch_size / ref_batch_size
and the same steps (same Total Amount of Noise; TAN paper, Section 4). The
simulations are NOT private. It prints the ranking, the compute ledger and
the exact command of the final private run with the best configuration.

Grid syntax: `--grid='flag=v1,v2;flag2=v1,v2'` over `tan_keras.train` flags
(';' separates axes, ',' values); --grid may also be repeated, one axis each.
Each value is checked as tan_keras.train would check it before any run.
Every grid point runs once per --seeds entry. Extra fixed training flags go
in --train_flags (a shell-quoted string).

Example (digits, 2 x 2 grid, 2 seeds, 16x cheaper than the private run):
  python -m tan_keras.search --dataset=digits --ref_batch_size=1024 \
    --ref_noise_multiplier=5 --steps=100 --batch_size=64 \
    --grid='lr=2,4;augmult=1,2' --seeds=0,1 --output_dir=runs/search_digits

What the simulations train on decides what the final run's guarantee
covers, and the search says which in one sentence (printed, and in
results.json as coverage.statement):
  default              the private set itself: the final run's epsilon does
                       NOT cover the choice of hyper-parameters;
  --tuning_examples=n  a tuning split of n examples held out of the train
                       split (uniformly random, --tuning_split_seed): the
                       final run trains on the other N - n, and its epsilon
                       covers every one of them, the choice included;
  --tuning_dataset=D   another dataset (a public proxy): likewise covered.

Several --batch_size values (e.g. 32,64) also fit the scaling law
acc = a - b log2(B) for the best configuration and predict its accuracy at
--ref_batch_size with a prediction interval. Every run trains in this
process (TensorFlow loads once). Runs whose metrics.json exists in
--output_dir are skipped, so an interrupted search resumes where it stopped.
Bad flags exit with status 2 and one line on stderr.
"""

import shlex
import sys

from absl import app, flags

from tan_keras import _cli, _validate
from tan_keras.training import search_lib, search_results

# Typed flags, checked when parsed (one-line message naming flag and range).
_REF_BATCH_SIZE = _cli.define_checked(
    "ref_batch_size",
    None,
    "B_ref of the private run to tune. Required.",
    int,
    lambda v: _validate.positive_int("ref_batch_size", v),
)
_REF_NOISE_MULTIPLIER = _cli.define_checked(
    "ref_noise_multiplier",
    None,
    "sigma_ref of the private run. Required.",
    float,
    lambda v: _validate.positive("ref_noise_multiplier", v),
)
_STEPS = _cli.define_checked(
    "steps",
    None,
    "S: noisy updates of every run. Required.",
    int,
    lambda v: _validate.positive_int("steps", v),
)
_BATCH_SIZE = flags.DEFINE_list(
    "batch_size", None, "Simulation batch size(s) B <= ref_batch_size, e.g. 64 or 32,64."
)
_DATASET = flags.DEFINE_string("dataset", "digits", "Dataset (a tan_keras.train --dataset).")
_GRID = flags.DEFINE_multi_string(
    "grid", None, "Grid axes 'flag=v1,v2;flag2=v1,v2' over tan_keras.train flags. Required."
)
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Training seeds; each config runs once per seed.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "runs/search", "Runs and results go here.")
_TRAIN_FLAGS = flags.DEFINE_string(
    "train_flags", "", "Fixed tan_keras.train flags for every run, e.g. '--model=small_cnn'."
)
_METRIC = flags.DEFINE_string(
    "metric", "test_accuracy_ema", "Metrics key to rank by (test_accuracy without EMA)."
)
_CONFIDENCE = _cli.define_checked(
    "confidence", 0.95, "Coverage of the prediction interval at B_ref, in (0, 1).", float
)
_VERIFY = flags.DEFINE_bool(
    "verify_final_command", True, "Check the final command with tan_keras.train --dry_run."
)
_QUIET = flags.DEFINE_bool(
    "quiet", True, "Send each run's output to <output_dir>/logs instead of the terminal."
)
_TUNING_EXAMPLES = _cli.define_checked(
    "tuning_examples",
    None,
    "Hold out this many examples of the train split for the simulations; the final run "
    "trains on the others, so its guarantee covers the tuning. Default: tune on the "
    "private set (NOT covered).",
    int,
    lambda v: _validate.positive_int("tuning_examples", v),
)
_TUNING_SPLIT_SEED = _cli.define_checked(
    "tuning_split_seed",
    0,
    "Public seed of the tuning split's draw, >= 0.",
    int,
    lambda v: _validate.integer("tuning_split_seed", v, low=0),
)
_TUNING_DATASET = flags.DEFINE_string(
    "tuning_dataset",
    None,
    "Train the simulations on this dataset (a public proxy) instead of --dataset.",
)
_KEEP_CHECKPOINTS = flags.DEFINE_bool(
    "keep_checkpoints",
    False,
    "Keep each finished simulation's checkpoints (deleted by default: they hold the "
    "runs' noise and sampling keys).",
)


def main(argv):
    if len(argv) > 1:
        _cli.fail(f"unexpected positional arguments: {' '.join(argv[1:])!r}")
    number = _cli.parse_number
    try:
        for name, holder in (
            ("ref_batch_size", _REF_BATCH_SIZE),
            ("ref_noise_multiplier", _REF_NOISE_MULTIPLIER),
            ("steps", _STEPS),
            ("batch_size", _BATCH_SIZE),
            ("grid", _GRID),
        ):
            if not holder.value:
                raise _validate.invalid(name, "a value (the flag is required)", None)
        spec = search_lib.SearchSpec(
            ref_batch_size=_REF_BATCH_SIZE.value,
            ref_noise_multiplier=_REF_NOISE_MULTIPLIER.value,
            steps=_STEPS.value,
            batch_sizes=tuple(number(b) for b in _BATCH_SIZE.value),
            dataset=_DATASET.value,
            grid=search_lib.parse_grid(_GRID.value),
            seeds=tuple(number(s) for s in _SEEDS.value),
            output_dir=_OUTPUT_DIR.value,
            train_flags=tuple(shlex.split(_TRAIN_FLAGS.value)),
            metric=_METRIC.value,
            confidence=_CONFIDENCE.value,
            keep_checkpoints=_KEEP_CHECKPOINTS.value,
            tuning_examples=_TUNING_EXAMPLES.value,
            tuning_split_seed=_TUNING_SPLIT_SEED.value,
            tuning_dataset=_TUNING_DATASET.value,
        )
    except ValueError as err:
        _cli.fail(str(err))
    logs = f"{spec.output_dir}/logs" if _QUIET.value else None
    runner = search_lib.in_process_runner(logs)
    print(search_lib.tuning_data_line(spec), flush=True)
    try:
        records, trained, skipped = search_lib.run_search(
            spec, runner, log=lambda line: print(line, flush=True)
        )
        summary = search_results.summarize(spec, records)
        csv_path, json_path = search_results.write_results(spec, records, summary)
        print(search_results.format_report(summary, trained, skipped))
        if _VERIFY.value:
            # The command must run as printed: tan_keras.train --dry_run checks
            # every flag (and B_ref <= N), prints the privacy plan, writes nothing.
            search_lib.check_command(summary["final_argv"], runner)
            print("(final command checked: accepted by tan_keras.train --dry_run)")
    except ValueError as err:
        _cli.fail(str(err))
    except RuntimeError as err:
        # A training run failed: keep its log tail readable (several lines).
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(f"results: {csv_path} {json_path}")


if __name__ == "__main__":
    app.run(main, flags_parser=_cli.parse_flags)
