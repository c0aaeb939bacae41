"""Kill -9 a training run, --resume it: same steps, epsilon and weights as no kill.

Also: a corrupted, foreign or mismatched checkpoint given to --resume is
refused with one clear line, never restarted at step 0.
"""

import contextlib
import io
import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from _helpers import refusal_line
from train_test import run_cli

from tan_keras import train

# Both seeds fixed (not private: debugging), augmentation on with 2 views
# (each keyed by the step, the example and the view), momentum on (its slots
# must be restored too): the resumed run must reproduce the uninterrupted one
# exactly.
STEPS = 40
ARGS = [
    "--batch_size=256",
    "--augmult=2",
    "--augment=digits",
    f"--steps={STEPS}",
    "--checkpoint_every=5",
    "--momentum=0.5",
    "--ema_decay=0.9",
    "--seed=1",
    "--noise_seed=3",
]


def _command(model_dir, *extra):
    return [sys.executable, "-m", "tan_keras.train", *ARGS, f"--model_dir={model_dir}", *extra]


def _run(model_dir, *extra):
    proc = subprocess.run(_command(model_dir, *extra), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((model_dir / "metrics.json").read_text()), proc.stdout


def _saved_steps(model_dir):
    """Steps of the checkpoints listed in the index (complete checkpoints only)."""
    index = model_dir / "checkpoints" / "checkpoint"
    if not index.exists():
        return []
    return [
        int(line.split("ckpt-")[1].rstrip('"'))
        for line in index.read_text().splitlines()
        if line.startswith("all_model_checkpoint_paths")
    ]


def _variables(model_dir):
    reader = tf.train.load_checkpoint(str(model_dir / "checkpoints"))
    names = reader.get_variable_to_shape_map()
    # The sampler's counter includes batches the input pipeline drew ahead
    # (never applied; rewound on resume): it depends on timing. The privacy
    # ledger's tables name each run's history by a random uid, and a resumed
    # run's checkpoint holds one more (on its root: the restored optimizer
    # slots, written outside any layer, carry the checkpoint's history); the
    # ledger is compared through the steps and epsilon in metrics.json.
    return {
        name: reader.get_tensor(name)
        for name in names
        if "save_counter" not in name
        and "sampler/next_step" not in name
        and "dp_ledger/" not in name
        and name != "_CHECKPOINTABLE_OBJECT_GRAPH"
    }


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    split, full = tmp_path / "split", tmp_path / "full"
    proc = subprocess.Popen(_command(split), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not _saved_steps(split):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    killed_at = max(_saved_steps(split))
    assert 5 <= killed_at < STEPS and not (split / "metrics.json").exists()

    resumed, log = _run(split, "--resume")
    assert f"at dp_steps={killed_at}" in log
    uninterrupted, _ = _run(full)

    for key in ("steps", "epsilon", "eta", "gradient_evaluations", "noise_multiplier"):
        assert resumed[key] == uninterrupted[key], key
    assert resumed["steps"] == STEPS
    # Same seeds: the same batches, views and noise in the same order, nothing
    # replayed or skipped, so the same final weights, EMA and momentum.
    assert resumed["test_accuracy"] == uninterrupted["test_accuracy"]
    assert resumed["test_accuracy_ema"] == uninterrupted["test_accuracy_ema"]
    got, want = _variables(split), _variables(full)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


# A finished 2-step run, copied and damaged by the tests below.
FINISHED = ["--batch_size=64", "--augmult=1", "--augment=none", "--steps=2", "--noise_multiplier=1"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("done") / "run"
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        with pytest.raises(SystemExit) as done:
            train.cli(["tan_keras.train", *FINISHED, f"--model_dir={run_dir}"])
    assert (done.value.code or 0) == 0, log.getvalue()[-3000:]
    return run_dir


def _copy(run_dir, tmp_path, without_config=False):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "metrics.json").unlink()
    if without_config:
        (copy / "train_config.json").unlink()
    return copy


def _refused(copy, overrides, capsys):
    """Resumes `copy` with the finished run's flags + overrides; expects a refusal."""
    before = sorted((p.relative_to(copy), p.stat().st_size) for p in copy.rglob("*"))
    code, _, err = run_cli([*FINISHED, *overrides, "--resume", f"--model_dir={copy}"], capsys)
    line = refusal_line(code, err)
    after = sorted((p.relative_to(copy), p.stat().st_size) for p in copy.rglob("*"))
    assert after == before  # nothing written: in particular no restart at step 0
    return line


def test_corrupted_checkpoint_is_refused(finished_run, tmp_path, capsys):
    copy = _copy(finished_run, tmp_path)
    for data in (copy / "checkpoints").glob("*.data-*"):
        data.write_bytes(b"garbage")
    line = _refused(copy, [], capsys)
    assert "corrupted" in line and "step 0" in line


def test_garbled_checkpoint_index_is_refused(finished_run, tmp_path, capsys):
    copy = _copy(finished_run, tmp_path)
    (copy / "checkpoints" / "checkpoint").write_text("model_checkpoint_path: {{{")
    line = _refused(copy, [], capsys)
    assert "checkpoint index" in line and "step 0" in line


def test_foreign_dp_checkpoint_is_refused(finished_run, tmp_path, capsys):
    # Without train_config.json only the checkpoint's own DP fingerprint can
    # tell that it was trained with another noise multiplier.
    copy = _copy(finished_run, tmp_path, without_config=True)
    line = _refused(copy, ["--noise_multiplier=2"], capsys)
    assert "another DP configuration" in line


def test_resume_with_other_flags_is_refused(finished_run, tmp_path, capsys):
    copy = _copy(finished_run, tmp_path)
    line = _refused(copy, ["--lr=1"], capsys)
    assert line.startswith("error: Invalid value for `lr`: expected 4.0") and "lr=1.0" in line
