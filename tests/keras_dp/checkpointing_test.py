"""Checkpoint and resume: same steps, same epsilon, no replayed noise."""

import json
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from _helpers import LOSS, flat

from tan_keras.keras_dp import checkpointing, step_identity
from tan_keras.keras_dp import ledger as ledger_lib
from tan_keras.keras_dp.callbacks import PrivacyAccountant
from tan_keras.keras_dp.dp_model import DPKerasModel
from tan_keras.mechanism import sampling

N, B = 64, 8
DELTA = 1e-3


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(N, 4)).astype(np.float32), rng.integers(0, 3, N).astype(np.int32)


def _run(directory, steps, resume=False, sigma=1.0, physical=4, noise_seed=11, exact=False, seed=5):
    """Builds model + sampler from scratch (as a new process would) and trains."""
    # Every run stands for a process of its own, which remembers no weight
    # values. In this one, an earlier run with the same seeds left the same
    # values, with its own history, and the fingerprint memory (ledger.py)
    # would add it: to a restored model, or to a checkpoint of this run (a
    # padded step ends a Keras epoch here, where the earlier run remembered
    # its values; SGD's momentum after step 1 equals the zero-initialized
    # bias after it, and the momentum is written outside any layer).
    ledger_lib._REMEMBERED.clear()
    keras.utils.set_random_seed(0)
    inp = keras.Input((4,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = DPKerasModel(
            inp,
            keras.layers.Dense(3)(keras.layers.Dense(5, activation="tanh")(inp)),
            l2_norm_clip=1.0,
            noise_multiplier=sigma,
            expected_batch_size=B,
            dataset_size=N,
            ema_decay=0.9,
            noise_seed=noise_seed,
        )
        sampler = sampling.PoissonSampler(N, B, physical_batch_size=physical, seed=seed)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss=LOSS)
    ckpt = checkpointing.DPCheckpoint(str(directory), model, sampler)
    if resume:
        ckpt.restore(exact_resume=exact)
    x, y = _data()
    ds = sampling.make_poisson_dataset(x, y, sampler)
    accountant = PrivacyAccountant(delta=DELTA, max_steps=steps)
    model.fit(
        ds,
        epochs=100,
        steps_per_epoch=5,
        verbose=0,
        callbacks=[accountant, checkpointing.DPCheckpointCallback(ckpt, every_steps=1)],
    )
    return model, accountant


# 19 rows (B + 4 std): one micro-batch a step, steps span Keras epochs; 4
# rows: every step padded to 5 micro-batches, one Keras epoch each.
@pytest.mark.parametrize("physical", [19, 4])
def test_resume_continues_exactly_where_it_stopped(tmp_path, physical):
    full, full_acc = _run(tmp_path / "full", steps=6, physical=physical)
    _run(tmp_path / "split", steps=3, physical=physical)
    resumed, resumed_acc = _run(tmp_path / "split", steps=6, resume=True, physical=physical)
    assert int(resumed.dp_steps.numpy()) == int(full.dp_steps.numpy()) == 6
    assert resumed_acc.epsilon() == full_acc.epsilon()
    # Same seeds: identical weights, EMA and optimizer state prove that no
    # batch or noise draw was replayed or skipped.
    np.testing.assert_allclose(flat(resumed.get_weights()), flat(full.get_weights()), atol=1e-6)
    np.testing.assert_allclose(flat(resumed.ema_variables), flat(full.ema_variables), atol=1e-6)
    assert int(resumed.optimizer.iterations.numpy()) == int(full.optimizer.iterations.numpy())
    np.testing.assert_allclose(
        flat(resumed.optimizer.variables), flat(full.optimizer.variables), atol=1e-6
    )


def test_power_check_resume_that_replays_batches_diverges(tmp_path, monkeypatch):
    """If the sampler restarted at step 0 (replaying batches), weights would differ."""
    full, _ = _run(tmp_path / "full", steps=4)
    _run(tmp_path / "split", steps=2)
    monkeypatch.setattr(
        sampling.PoissonSampler, "resume_at", lambda self, step, keep_key=False: None
    )
    original = checkpointing.DPCheckpoint.__init__

    def without_sampler(self, directory, model, sampler=None, max_to_keep=3):
        original(self, directory, model, sampler, max_to_keep)
        del self._checkpoint.sampler  # the bug: sampler state not checkpointed

    monkeypatch.setattr(checkpointing.DPCheckpoint, "__init__", without_sampler)
    # The model refuses the replayed steps before any update...
    with pytest.raises(step_identity.SamplingIdentityError, match="replayed a Poisson step"):
        _run(tmp_path / "split", steps=4, resume=True)
    # ...and without that check the replay would train, to other weights.
    monkeypatch.setattr(step_identity, "check", lambda *args, **kwargs: tf.constant(0, tf.int64))
    resumed, _ = _run(tmp_path / "split2", steps=2)
    resumed, _ = _run(tmp_path / "split2", steps=4, resume=True)
    assert not np.allclose(flat(resumed.get_weights()), flat(full.get_weights()), atol=1e-6)


def test_secret_noise_key_is_restored_only_for_an_exact_resume(tmp_path):
    first, _ = _run(tmp_path / "a", steps=2, noise_seed=None)
    resumed, _ = _run(tmp_path / "a", steps=3, resume=True, noise_seed=None, exact=True)
    np.testing.assert_array_equal(resumed.noise_key.numpy(), first.noise_key.numpy())


def test_every_restore_of_a_copied_checkpoint_draws_fresh_keys(tmp_path):
    # A copy of the checkpoint carries no trace of the other restore: two
    # runs from one warm start (a sweep) must not share noise or batches.
    import shutil

    first, _ = _run(tmp_path / "a", steps=2, noise_seed=None, seed=None)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    keys = []
    for directory in ("a", "b"):
        resumed, _ = _run(tmp_path / directory, steps=3, resume=True, noise_seed=None, seed=None)
        assert int(resumed.dp_steps.numpy()) == 3
        keys.append(resumed.noise_key.numpy())
    assert not np.array_equal(keys[0], keys[1])
    assert not np.array_equal(keys[0], first.noise_key.numpy())
    # Power check: with exact_resume both copies continue the same noise.
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    same = [
        _run(tmp_path / d, steps=4, resume=True, noise_seed=None, seed=None, exact=True)[0]
        for d in ("b", "c")
    ]
    np.testing.assert_array_equal(same[0].noise_key.numpy(), same[1].noise_key.numpy())


def test_foreign_checkpoint_is_refused(tmp_path):
    _run(tmp_path / "a", steps=2)
    with pytest.raises(checkpointing.CheckpointError, match="another DP configuration"):
        _run(tmp_path / "a", steps=3, resume=True, sigma=2.0)


def test_corrupted_checkpoint_is_refused(tmp_path):
    _run(tmp_path / "a", steps=2)
    for data_file in (tmp_path / "a").glob("*.data-*"):
        data_file.write_bytes(b"garbage")
    with pytest.raises(checkpointing.CheckpointError, match="corrupted"):
        _run(tmp_path / "a", steps=3, resume=True)


def test_save_refuses_the_middle_of_a_logical_step(tmp_path):
    model, _ = _run(tmp_path / "a", steps=1, physical=2)
    model._secret.pending.assign(1)
    with pytest.raises(RuntimeError, match="middle of a logical step"):
        checkpointing.DPCheckpoint(str(tmp_path / "b"), model).save()


def test_restore_in_a_fresh_process_reports_the_same_steps(tmp_path):
    _run(tmp_path / "a", steps=3)
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(tmp_path.parent.parent)!r})
        sys.path.insert(0, {__file__.rsplit("/", 2)[0]!r})
        sys.path.insert(0, {__file__.rsplit("/", 1)[0]!r})
        from checkpointing_test import _run
        model, accountant = _run({str(tmp_path / "a")!r}, steps=3, resume=True)
        print(json.dumps({{"steps": int(model.dp_steps.numpy()), "eps": accountant.epsilon()}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    _, accountant = _run(tmp_path / "b", steps=3)
    assert result == {"steps": 3, "eps": accountant.epsilon(3)}
