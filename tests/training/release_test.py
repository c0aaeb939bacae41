"""--release=private: no statistic computed without noise on private data leaves the run."""

import json

import pytest
import tensorflow as tf
from _helpers import noiseless_statistics_released

from tan_keras import train
from tan_keras.privacy import accounting


def test_release_private_writes_and_prints_only_private_outputs(tmp_path, capsys):
    # With the noisy clipped fraction and validation on the test split: the
    # two kinds of training-time output --release=private keeps.
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as done:
        train.cli(
            [
                "tan_keras.train",
                "--steps=3",
                "--eval_every=2",
                "--release=private",
                "--clipped_fraction_std=0.05",
                f"--model_dir={run_dir}",
            ]
        )
    printed = capsys.readouterr()
    assert (done.value.code or 0) == 0, printed.err[-3000:]
    found = noiseless_statistics_released(run_dir, printed.out + printed.err)
    assert found == {"tensorboard": set(), "printed": set(), "files": set()}
    # The scan read the training logs: the private ones are there.
    tags = {
        value.tag
        for events in (run_dir / "tensorboard" / "train").glob("events.out.tfevents*")
        for event in tf.compat.v1.train.summary_iterator(str(events))
        for value in event.summary.value
    }
    assert {"epoch_epsilon", "epoch_noisy_clipped_fraction"} <= tags
    assert "noisy_clipped_fraction" in printed.out and "val_accuracy" in printed.out
    assert "Not covered by epsilon" not in printed.out

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["release"] == "private" and metrics["noiseless_private_outputs"] == []
    # The count is accounted with the updates: sigma_eff < sigma.
    sigma, count_sigma = metrics["noise_multiplier"], 0.05 * metrics["batch_size"]
    effective = accounting.effective_noise_multiplier(sigma, count_sigma)
    assert metrics["accounted_noise_multiplier"] == pytest.approx(effective, rel=1e-12)
    q = metrics["sampling_rate"]
    assert metrics["epsilon"] == pytest.approx(
        accounting.compute_epsilon(effective, q, 3, metrics["delta"]), rel=1e-9
    )
    assert metrics["epsilon"] > accounting.compute_epsilon(sigma, q, 3, metrics["delta"])
    assert metrics["clipped_fraction_epsilon"] == pytest.approx(
        accounting.compute_epsilon(count_sigma, q, 3, metrics["delta"]), rel=1e-9
    )
