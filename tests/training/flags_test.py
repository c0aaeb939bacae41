"""The flagfiles in flags/: they parse, plan the paper's privacy, and train.

Each flagfile runs for 2 steps on `tfds.testing.mock_data` with the model it
names; only the batch sizes, the step count and (ImageNet, for CPU time) the
number of views are overridden to tiny values. The planned epsilon and eta
are checked at the real dataset sizes against the TAN paper (docs/tan-method.md
section 3).
"""

import json
import pathlib

import pytest
import tensorflow_datasets as tfds
from absl import flags
from train_test import run_cli

from tan_keras import train
from tan_keras.training import train_config, train_plan

FLAGS_DIR = pathlib.Path(__file__).resolve().parents[2] / "flags"
CIFAR10_N = 50_000
IMAGENET_N = 1_281_167

# flagfile: (N, reference-run epsilon, eta), paper values (RDP accountant).
PAPER = {
    "cifar10_wrn16_4.cfg": (CIFAR10_N, 7.10, 0.965),
    "cifar10_wrn16_4_sim256.cfg": (CIFAR10_N, 7.10, 0.965),
    "imagenet_nfresnet50.cfg": (IMAGENET_N, 7.98, 0.971),
    "imagenet_nfresnet50_sim256.cfg": (IMAGENET_N, 7.98, 0.971),
}


def _config(flagfile, *overrides):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["tan_keras.train", f"--flagfile={FLAGS_DIR / flagfile}", *overrides])
    try:
        return train.config_from_flags()
    finally:
        flags.FLAGS.unparse_flags()


def test_every_flagfile_is_tested():
    assert sorted(p.name for p in FLAGS_DIR.glob("*.cfg")) == sorted(
        [*PAPER, "digits_small_cnn.cfg"]
    )


@pytest.mark.parametrize("flagfile", sorted(PAPER))
def test_flagfile_plans_the_paper_privacy(flagfile):
    n, epsilon, eta = PAPER[flagfile]
    text = (FLAGS_DIR / flagfile).read_text()
    assert text.startswith("#") and f"--flagfile=flags/{flagfile}" in text
    config = _config(flagfile)
    plan = train_plan.plan_privacy(config, n)
    simulated = flagfile.endswith("_sim256.cfg")
    reference = plan.reference if simulated else plan
    assert reference.epsilon == pytest.approx(epsilon, abs=0.01)
    assert reference.eta == pytest.approx(eta, abs=0.001)
    assert plan.eta == pytest.approx(reference.eta, rel=1e-12)
    assert plan.simulation == simulated and plan.private == (not simulated)
    if simulated:
        assert config.batch_size == 256
        assert plan.compute_saving == config.ref_batch_size / 256
        assert plan.epsilon > 10 * epsilon  # the simulation itself is not private


def test_digits_flagfile_is_the_defaults():
    assert _config("digits_small_cnn.cfg") == train_config.TrainConfig()


# Tiny sizes for the 2-step runs on mock data (N = 4 train and test images).
TINY = ["--batch_size=2", "--physical_batch_size=2", "--steps=2"]


# The CIFAR-10 recipe trains; the ImageNet recipe's pipeline trains end to end
# in imagenet_input_test and NF-ResNet-50 is checked DP-friendly in
# models_test (two steps of it at 224x224 take over a minute on 2 cores);
# simulations are planned above and train in the search's tests; the digits
# flagfile is the defaults, which train_test trains.
@pytest.mark.parametrize(
    "flagfile, extra",
    [("cifar10_wrn16_4.cfg", [])],
)
def test_flagfile_trains_two_steps(flagfile, extra, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = [f"--flagfile={FLAGS_DIR / flagfile}", *TINY, *extra, f"--model_dir={run_dir}"]
    with tfds.testing.mock_data(num_examples=4):
        code, out, err = run_cli(args, capsys)
    assert code == 0, err[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = _config(flagfile, *TINY, *extra)
    assert metrics["model"] == config.model and metrics["dataset"] == config.dataset
    assert metrics["steps"] == 2 and metrics["augmult"] == config.augmult
    assert metrics["simulation"] == flagfile.endswith("_sim256.cfg")
    assert ("NOT PRIVATE" in out) == metrics["simulation"]
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
