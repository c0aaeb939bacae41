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

import time  # noqa: E402

from absl import app, flags  # noqa: E402

from tan_keras import _cli  # noqa: E402
from tan_keras.training import program, train_flags  # noqa: E402
from tan_keras.training.train_config import TrainConfig  # noqa: E402

# Typed flags: each value is checked when parsed, with the package's one-line
# message naming the flag, its range and the value.
train_flags.define(flags.FLAGS)
flags.adopt_module_key_flags(train_flags)


def main(argv):
    start = time.monotonic()
    if len(argv) > 1:
        _cli.fail(f"unexpected positional arguments: {' '.join(argv[1:])!r}")
    try:
        program.run(config_from_flags(), start)
    except ValueError as err:
        # Bad flags, unavailable datasets and refused checkpoints (all
        # ValueErrors) are reported before anything is written.
        _cli.fail(str(err))


def config_from_flags() -> TrainConfig:
    """Reads every flag once into a validated `TrainConfig`.

    Returns:
      The run's settings.

    Raises:
      ValueError: naming the flag, on a bad combination.
    """
    return TrainConfig(**train_flags.settings(flags.FLAGS))


def cli(argv=None):
    """Runs the program as from the command line (exits via SystemExit).

    Args:
      argv: Full argument list including the program name; None uses sys.argv.
    """
    app.run(main, argv=argv, flags_parser=_cli.parse_flags)


if __name__ == "__main__":
    cli()
