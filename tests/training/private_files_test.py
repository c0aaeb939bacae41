"""What a run writes stays with its owner: checkpoints, keys, logs and metrics.

A checkpoint holds the noise key and the sampler's key (whoever reads them can
subtract the noise, and knows which examples each step used); the logs and
metrics hold statistics of private examples computed without noise. The run
directory is 0700 and its checkpoint and record files 0600 whatever the
umask, checkpoints can be deleted once a run finished (the search does it by
default), and a sampling key file that others can read is refused.
"""

import os
import stat

import pytest
import tensorflow as tf
from train_test import run_cli

from tan_keras.training import search_lib, train_config

TINY = ["--batch_size=64", "--augmult=1", "--augment=none", "--steps=2", "--noise_multiplier=1"]


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def open_umask():
    old = os.umask(0o022)  # the usual default: files readable by everyone
    yield
    os.umask(old)


def test_a_runs_directory_checkpoints_and_records_are_owner_only(tmp_path, capsys, open_umask):
    run_dir = tmp_path / "run"
    code, _, err = run_cli([*TINY, f"--model_dir={run_dir}"], capsys)
    assert code == 0, err
    assert _mode(run_dir) == 0o700
    checkpoints = run_dir / train_config.CHECKPOINT_SUBDIR
    files = [p for p in checkpoints.rglob("*") if p.is_file()]
    assert any(p.name.endswith(".index") for p in files)
    assert _mode(checkpoints) == 0o700
    assert all(_mode(p) == 0o600 for p in files), [(p.name, oct(_mode(p))) for p in files]
    for name in (train_config.CONFIG_FILE, train_config.METRICS_FILE):
        assert _mode(run_dir / name) == 0o600


def test_power_check_tensorflow_alone_writes_checkpoints_others_can_read(tmp_path, open_umask):
    # What the restriction above undoes: under umask 022 TensorFlow's own
    # checkpoint files are readable by every user of the machine.
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(key=tf.Variable(7, dtype=tf.int64)), str(tmp_path), max_to_keep=1
    )
    manager.save()
    assert any(_mode(p) & 0o044 for p in tmp_path.iterdir() if p.is_file())


def test_delete_checkpoints_removes_them_once_the_run_finished(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, err = run_cli([*TINY, "--delete_checkpoints", f"--model_dir={run_dir}"], capsys)
    assert code == 0, err
    assert not (run_dir / train_config.CHECKPOINT_SUBDIR).exists()
    assert (run_dir / train_config.METRICS_FILE).exists()
    assert "checkpoints deleted" in out


def test_a_sampling_key_others_can_read_is_refused(tmp_path):
    key = tmp_path / "key"
    key.write_text("1234567890123\n")
    key.chmod(0o644)
    with pytest.raises(ValueError, match=r"Invalid value for `sampling_key_file`.*chmod 600"):
        train_config.read_sampling_key(str(key))
    key.chmod(0o600)
    assert train_config.read_sampling_key(str(key)) == 1234567890123


@pytest.mark.parametrize("keep", [False, True])
def test_the_search_deletes_its_simulations_checkpoints_unless_kept(tmp_path, keep):
    spec = search_lib.SearchSpec(
        ref_batch_size=512,
        ref_noise_multiplier=2.0,
        steps=10,
        batch_sizes=(64,),
        dataset="digits",
        grid=search_lib.parse_grid(["lr=1,2"]),
        output_dir=str(tmp_path),
        keep_checkpoints=keep,
    )
    settings = search_lib.simulation_settings(spec, spec.configs[0], 64, 0)
    assert settings["delete_checkpoints"] is (not keep)
    # And the program accepts it as given.
    assert train_config.TrainConfig(**settings).delete_checkpoints is (not keep)
