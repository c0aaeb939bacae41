r"""Privacy of DP-SGD runs and TAN simulation plans, from the command line.

Epsilon of a run (CIFAR-10 recipe of the TAN paper: epsilon 7.10):
  python -m tan_keras.privacy --dataset_size=50000 --batch_size=4096 \
    --noise_multiplier=3 --steps=2500 --delta=1e-5

Noise multiplier for a budget:
  python -m tan_keras.privacy --dataset_size=50000 --batch_size=4096 \
    --steps=2500 --delta=1e-5 --target_eps=8

A 16x cheaper, NOT private simulation of that run, to tune hyper-parameters:
  python -m tan_keras.privacy --dataset_size=50000 --ref_batch_size=4096 \
    --ref_noise_multiplier=3 --steps=2500 --delta=1e-5 --batch_size=256

Add --json for one JSON object (non-finite numbers are null). In a plan, the
top-level keys describe the reference (private) run; `simulation` is the run
to launch. Bad input exits with status 2 and one line on stderr.
"""

from absl import app, flags

from tan_keras import _cli, _validate
from tan_keras.privacy import cli

# Typed flags: each number is checked when parsed, with the package's one-line
# message naming the flag, its range and the value. A required flag left out
# is reported by `cli.report`, which knows what may replace it.
_DATASET_SIZE = _cli.define_checked(
    "dataset_size",
    None,
    "N: distinct training examples (integer >= 1). Required.",
    int,
    lambda v: _validate.positive_int("dataset_size", v),
)
_BATCH_SIZE = _cli.define_checked(
    "batch_size",
    None,
    "B: expected batch size, integer in [1, N] (in a plan: the simulation's, "
    "<= ref_batch_size). Required.",
    int,
    lambda v: _validate.positive_int("batch_size", v),
)
_NOISE_MULTIPLIER = _cli.define_checked(
    "noise_multiplier",
    None,
    "sigma > 0 (or give --target_eps).",
    float,
    lambda v: _validate.positive("noise_multiplier", v),
)
_STEPS = _cli.define_checked(
    "steps",
    None,
    "S: noisy updates, integer >= 1.",
    int,
    lambda v: _validate.positive_int("steps", v),
)
_EPOCHS = _cli.define_checked(
    "epochs",
    None,
    "Instead of --steps: passes over the data, S = ceil(epochs * N / B) "
    "(B = ref_batch_size in a plan).",
    float,
    lambda v: _validate.positive("epochs", v),
)
_DELTA = _cli.define_checked(
    "delta",
    None,
    "Target delta in (0, 1), well below 1/N (paper: 1e-5 CIFAR-10, 8e-7 "
    "ImageNet). Required: no default fits every dataset.",
    float,
    lambda v: _validate.delta("delta", v),
)
_TARGET_EPS = _cli.define_checked(
    "target_eps",
    None,
    "Solve for the noise multiplier that meets this epsilon.",
    float,
    lambda v: _validate.positive("target_eps", v),
)
_REF_BATCH_SIZE = _cli.define_checked(
    "ref_batch_size",
    None,
    "Plan: B_ref of the private run to simulate.",
    int,
    lambda v: _validate.positive_int("ref_batch_size", v),
)
_REF_NOISE_MULTIPLIER = _cli.define_checked(
    "ref_noise_multiplier",
    None,
    "Plan: sigma_ref of the private run to simulate.",
    float,
    lambda v: _validate.positive("ref_noise_multiplier", v),
)
_AUGMULT = _cli.define_checked(
    "augmult",
    1,
    "K: augmentation multiplicity (changes only compute).",
    int,
    lambda v: _validate.positive_int("augmult", v),
)
_CLIPPED_FRACTION_STD = _cli.define_checked(
    "clipped_fraction_std",
    None,
    "The run also releases its clipped fraction with this noise std (count noise "
    "std * B); epsilon accounts both (sigma_eff).",
    float,
    lambda v: _validate.positive("clipped_fraction_std", v),
)
_ACCOUNTANT = flags.DEFINE_string("accountant", "rdp", "rdp or pld.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")


def main(argv):
    if len(argv) > 1:
        _cli.fail(f"unexpected positional arguments: {' '.join(argv[1:])!r}")
    try:
        result = cli.report(
            dataset_size=_DATASET_SIZE.value,
            batch_size=_BATCH_SIZE.value,
            delta=_DELTA.value,
            noise_multiplier=_NOISE_MULTIPLIER.value,
            steps=_STEPS.value,
            epochs=_EPOCHS.value,
            target_eps=_TARGET_EPS.value,
            ref_batch_size=_REF_BATCH_SIZE.value,
            ref_noise_multiplier=_REF_NOISE_MULTIPLIER.value,
            augmult=_AUGMULT.value,
            accountant=_ACCOUNTANT.value,
            clipped_fraction_std=_CLIPPED_FRACTION_STD.value,
        )
    except ValueError as err:
        _cli.fail(str(err))
    print(cli.to_json(result) if _JSON.value else cli.format_report(result))


if __name__ == "__main__":
    app.run(main, flags_parser=_cli.parse_flags)
