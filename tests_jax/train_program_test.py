"""The training program on the JAX backend (`python -m tan_keras.train`), in process."""

import json
import os
import subprocess
import sys
import textwrap

import _jax_helpers as helpers
import keras
import numpy as np
import pytest

from tan_keras import _startup
from tan_keras.privacy import accounting
from tan_keras.training import jax_run, program, search_lib
from tan_keras.training.train_config import TrainConfig

# A short digits run: B 128 of N 1437, K 2 views, 4 updates.
_SHORT = dict(
    dataset="digits",
    batch_size=128,
    steps=4,
    augmult=2,
    target_eps=8.0,
    ema_decay=0.9,
    checkpoint_every=2,
)


def _run(tmp_path, **settings):
    config = TrainConfig(model_dir=str(tmp_path / "run"), **{**_SHORT, **settings})
    return program.run(config)


def test_a_short_digits_run_trains_exactly_s_updates_and_writes_its_metrics(tmp_path, capsys):
    metrics = _run(tmp_path)
    out = capsys.readouterr().out
    assert metrics["steps"] == metrics["planned_steps"] == 4
    # The epsilon of the updates applied, from the accountant itself.
    expected = accounting.compute_epsilon(
        metrics["noise_multiplier"], metrics["sampling_rate"], 4, metrics["delta"], "rdp"
    )
    assert metrics["epsilon"] == pytest.approx(expected) and metrics["epsilon"] <= 8.0
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["test_accuracy_ema"] is not None
    with open(tmp_path / "run" / "metrics.json", encoding="utf-8") as f:
        assert json.load(f)["steps"] == 4
    assert "epsilon" in out and "dp_steps=4" in out
    # The suite's 4 virtual devices each took a share of every step; the
    # distribution set for the run is gone after it.
    assert "devices: 4 cpu (keras.distribution.DataParallel)" in out
    assert keras.distribution.distribution() is None
    checkpoint = tmp_path / "run" / "checkpoints" / jax_run.CHECKPOINT_FILE
    assert oct(os.stat(checkpoint).st_mode & 0o777) == "0o600"
    assert int(keras.saving.load_model(checkpoint).dp_steps) == 4


@pytest.mark.parametrize(
    "name, value",
    [
        ("strategy", "mirrored"),
        ("noise_seed", 3),
        ("test_augmult", 2),
    ],
)
def test_what_needs_tensorflow_is_refused_by_flag_before_anything_is_written(tmp_path, name, value):
    with pytest.raises(ValueError, match=f"{name}.*JAX backend"):
        _run(tmp_path, **{name: value})
    assert not (tmp_path / "run").exists()


def test_a_policy_that_does_not_fit_the_images_is_refused_before_anything_is_written(tmp_path):
    # The ImageNet policy runs on JAX (tests_jax/imagenet_test.py), not on 8x8 digits.
    with pytest.raises(ValueError, match="augment.*reflect padding needs height and width > 20"):
        _run(tmp_path, augment="imagenet")
    assert not (tmp_path / "run").exists()


def test_a_tfds_dataset_without_tensorflow_is_refused_by_name_before_anything_is_written(
    tmp_path, monkeypatch
):
    # A Colab TPU runtime (tan_keras[jax]) has no TensorFlow to read CIFAR-10 with.
    def no_tensorflow():
        raise ImportError("No module named 'tensorflow'", name="tensorflow")

    monkeypatch.setattr(_startup, "load_tensorflow", no_tensorflow)
    with pytest.raises(ValueError, match=r"'cifar10' is read with TensorFlow Datasets.*tensorflow"):
        _run(tmp_path, dataset="cifar10")
    assert not (tmp_path / "run").exists()


def test_the_search_prints_a_final_command_that_runs_on_this_backend():
    command = search_lib.command_line(["--lr=2"])
    assert command == "KERAS_BACKEND=jax python -m tan_keras.train --lr=2"


class _Killed(Exception):
    pass


def test_a_killed_run_resumes_from_its_checkpoint_to_exactly_s_updates(tmp_path, monkeypatch):
    # Killed after update 3: the checkpoint holds 2 (every 2); the resumed
    # run trains the 2 left... from 2, to 4, and reports the epsilon of 4.
    saved = jax_run._Checkpoint.on_train_batch_end

    def killed_after_3(self, batch, logs=None):
        saved(self, batch, logs)
        if int(self.model.dp_steps) == 3:
            raise _Killed()

    with monkeypatch.context() as patch:
        patch.setattr(jax_run._Checkpoint, "on_train_batch_end", killed_after_3)
        with pytest.raises(_Killed):
            _run(tmp_path)
    checkpoint = tmp_path / "run" / "checkpoints" / jax_run.CHECKPOINT_FILE
    assert int(keras.saving.load_model(checkpoint).dp_steps) == 2
    metrics = _run(tmp_path, resume=True)
    assert metrics["steps"] == 4
    uninterrupted = accounting.compute_epsilon(
        metrics["noise_multiplier"], metrics["sampling_rate"], 4, metrics["delta"], "rdp"
    )
    assert metrics["epsilon"] == pytest.approx(uninterrupted)


def test_a_finished_run_is_never_restarted_and_resuming_it_trains_nothing(tmp_path):
    _run(tmp_path)
    with pytest.raises(ValueError, match="model_dir"):
        _run(tmp_path)
    before = keras.saving.load_model(
        tmp_path / "run" / "checkpoints" / jax_run.CHECKPOINT_FILE
    ).get_weights()
    metrics = _run(tmp_path, resume=True)
    assert metrics["steps"] == 4
    after = keras.saving.load_model(
        tmp_path / "run" / "checkpoints" / jax_run.CHECKPOINT_FILE
    ).get_weights()
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


def test_the_main_job_runs_where_tensorflow_cannot_be_imported(tmp_path):
    # `python -m tan_keras.train` as a user on a JAX-only machine runs it
    # (TensorFlow made unimportable), with a short run's flags.
    script = helpers.NO_TENSORFLOW + textwrap.dedent(
        """
        import runpy
        sys.argv = ["tan_keras.train"] + sys.argv[1:]
        runpy.run_module("tan_keras.train", run_name="__main__")
        """
    )
    flags = ["--steps=3", "--batch_size=128", f"--model_dir={tmp_path / 'run'}"]
    result = subprocess.run(
        [sys.executable, "-c", script, *flags],
        capture_output=True,
        text=True,
        env=dict(os.environ, KERAS_BACKEND="jax"),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dp_steps=3 epsilon=" in result.stdout
    # Nothing on stderr a user can do nothing about (JAX's TPU probe, C++ logs).
    assert result.stderr.strip() == "", result.stderr[-2000:]


def test_a_checkpoint_of_another_run_is_refused_on_resume(tmp_path):
    # The checkpoint file of a run with another clip norm, put in place of
    # this run's: resuming would continue another mechanism under this plan.
    _run(tmp_path)
    other = tmp_path / "other"
    program.run(TrainConfig(model_dir=str(other / "run"), **{**_SHORT, "l2_norm_clip": 0.5}))
    name = os.path.join("run", "checkpoints", jax_run.CHECKPOINT_FILE)
    os.replace(other / name, tmp_path / name)
    with pytest.raises(ValueError, match="l2_norm_clip"):
        _run(tmp_path, resume=True)
