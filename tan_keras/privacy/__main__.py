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

from tan_keras import _cli
from tan_keras.privacy import cli

# Numbers are read as text and converted by cli.parse_number, so that a bad
# value (2500.5 steps, "abc") reaches the package's validators and gets their
# one-line message naming the flag and its range, not absl's.
_DATASET_SIZE = flags.DEFINE_string(
    "dataset_size", None, "N: distinct training examples (integer >= 1). Required."
)
_BATCH_SIZE = flags.DEFINE_string(
    "batch_size",
    None,
    "B: expected batch size, integer in [1, N] (in a plan: the simulation's, "
    "<= ref_batch_size). Required.",
)
_NOISE_MULTIPLIER = flags.DEFINE_string(
    "noise_multiplier", None, "sigma > 0 (or give --target_eps)."
)
_STEPS = flags.DEFINE_string("steps", None, "S: noisy updates, integer >= 1.")
_EPOCHS = flags.DEFINE_string(
    "epochs",
    None,
    "Instead of --steps: passes over the data, S = ceil(epochs * N / B) "
    "(B = ref_batch_size in a plan).",
)
_DELTA = flags.DEFINE_string(
    "delta",
    None,
    "Target delta in (0, 1), well below 1/N (paper: 1e-5 CIFAR-10, 8e-7 "
    "ImageNet). Required: no default fits every dataset.",
)
_TARGET_EPS = flags.DEFINE_string(
    "target_eps", None, "Solve for the noise multiplier that meets this epsilon."
)
_REF_BATCH_SIZE = flags.DEFINE_string(
    "ref_batch_size", None, "Plan: B_ref of the private run to simulate."
)
_REF_NOISE_MULTIPLIER = flags.DEFINE_string(
    "ref_noise_multiplier", None, "Plan: sigma_ref of the private run to simulate."
)
_AUGMULT = flags.DEFINE_string(
    "augmult", "1", "K: augmentation multiplicity (changes only compute)."
)
_ACCOUNTANT = flags.DEFINE_string("accountant", "rdp", "rdp or pld.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")


def main(argv):
    if len(argv) > 1:
        _cli.fail(f"unexpected positional arguments: {' '.join(argv[1:])!r}")
    number = cli.parse_number
    try:
        result = cli.report(
            dataset_size=number(_DATASET_SIZE.value),
            batch_size=number(_BATCH_SIZE.value),
            delta=number(_DELTA.value),
            noise_multiplier=number(_NOISE_MULTIPLIER.value),
            steps=number(_STEPS.value),
            epochs=number(_EPOCHS.value),
            target_eps=number(_TARGET_EPS.value),
            ref_batch_size=number(_REF_BATCH_SIZE.value),
            ref_noise_multiplier=number(_REF_NOISE_MULTIPLIER.value),
            augmult=number(_AUGMULT.value),
            accountant=_ACCOUNTANT.value,
        )
    except ValueError as err:
        _cli.fail(str(err))
    print(cli.to_json(result) if _JSON.value else cli.format_report(result))


if __name__ == "__main__":
    app.run(main, flags_parser=_cli.parse_flags)
