"""Ledger escapes of the third review, round b (its scripts, as tests).

* a05: two branches forked from one saved file took the file's ledger uid
  as their own, and ledgers of one uid merged by maximum: an ensemble over
  both branches counted max(n0 + n1, n0 + n2) updates, not n0 + n1 + n2.
  Each ledger now advances only its own segment; what it learns from a file
  is a base segment, merged per uid by maximum and added across uids.
* a06: weights copied into a float64 copy of the model (the same values)
  were not recognised: the fingerprint hashed the dtype and shape. It now
  hashes the values as float64.

Every test has a power check: the same scenario with the old behaviour
fails it.
"""

import gc

import keras
import numpy as np
import pytest
from _helpers import LOSS, dense_model

import tan_keras
from tan_keras.keras_dp import checkpointing
from tan_keras.keras_dp import ledger as ledger_lib
from tan_keras.mechanism import sampling

N, B = 64, 16
DP = dict(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=B, dataset_size=N)


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(N, 4)).astype(np.float32), rng.integers(0, 3, N).astype(np.int32)


def _private(model):
    private = tan_keras.make_private(model, **DP)
    private.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    return private


def _train(private, steps):
    x, y = _data()
    sampler = sampling.PoissonSampler(N, B, physical_batch_size=N, pad_steps=True)
    # pad_steps: every step is one micro-batch, so the fit runs `steps` updates.
    private.fit(sampling.make_poisson_dataset(x, y, sampler), steps_per_epoch=steps, verbose=0)
    return steps


def _merged_by_maximum(monkeypatch):
    """The old ledger: every history met is one history, merged by maximum."""
    original = ledger_lib.PrivacyLedger._merge_segments

    def merge(self, segments):
        total = {}
        for segment in segments.values():
            for mechanism, (steps, epochs) in segment.items():
                s, e = total.get(mechanism, (0, 0))
                total[mechanism] = (s + steps, e + epochs)
        original(self, {self.root().uid: total})

    monkeypatch.setattr(ledger_lib.PrivacyLedger, "_merge_segments", merge)


def _always_added(monkeypatch):
    """A ledger without uids: every history met is added."""
    original = ledger_lib.PrivacyLedger._merge_segments

    def merge(self, segments):
        original(self, {ledger_lib._new_uid(): s for s in segments.values()})

    monkeypatch.setattr(ledger_lib.PrivacyLedger, "_merge_segments", merge)


def _ensemble(*models):
    inputs = keras.Input((4,))
    return keras.Model(inputs, keras.layers.Average()([m(inputs) for m in models]))


@pytest.mark.parametrize("power_check", [False, True])
def test_two_branches_forked_from_one_file_add_up(power_check, tmp_path, monkeypatch):
    if power_check:
        _merged_by_maximum(monkeypatch)
    a = dense_model()
    private_a = _private(a)
    n0 = _train(private_a, 4)
    path = str(tmp_path / "warm.weights.h5")
    private_a.save_weights(path)
    b = dense_model(seed=1)
    b.load_weights(path)
    private_b = _private(b)
    assert private_b.privacy_ledger.total_steps() == n0
    n1 = _train(private_b, 3)
    n2 = _train(private_a, 5)
    del private_a, private_b
    gc.collect()
    counted = tan_keras.make_private(_ensemble(a, b), **DP).privacy_ledger.total_steps()
    if power_check:
        assert counted == max(n0 + n1, n0 + n2) < n0 + n1 + n2
        return
    assert counted == n0 + n1 + n2


@pytest.mark.parametrize("power_check", [False, True])
def test_one_history_met_twice_is_counted_once(power_check, tmp_path, monkeypatch):
    if power_check:
        _always_added(monkeypatch)
    model = dense_model()
    private = _private(model)
    _train(private, 3)
    older = str(tmp_path / "older.weights.h5")
    private.save_weights(older)
    _train(private, 4)
    newer = str(tmp_path / "newer.weights.h5")
    private.save_weights(newer)
    # The model's own older file, restored in this process.
    private.load_weights(older)
    # Both files of one history, loaded into a fresh copy (a fresh process).
    copy = dense_model(seed=2)
    copy.load_weights(older)
    copy.load_weights(newer)
    second = _private(copy)
    counts = (private.privacy_ledger.total_steps(), second.privacy_ledger.total_steps())
    if power_check:
        assert counts[0] > 7 and counts[1] > 7
        return
    assert counts == (7, 7)
    # Its own segment under its uid; the copy's a base segment of it.
    assert private.privacy_ledger.uid in second.privacy_ledger.segments()
    assert second.privacy_ledger.uid != private.privacy_ledger.uid


def test_segments_travel_in_files_and_older_tables_are_added(tmp_path):
    model = dense_model()
    private = _private(model)
    _train(private, 2)
    ledger = private.privacy_ledger
    table = ledger_lib.segments_table(ledger.segments())
    assert table.shape == (1, 8) and table[0, 0] == ledger.uid < 2**52
    assert ledger_lib.segments_from_table(table) == ledger.segments()
    # A table without segments (an older file) is a history of its own, added.
    fresh = ledger_lib.PrivacyLedger()
    fresh.merge_table(ledger.table())
    fresh.merge_table(ledger.table())
    assert fresh.total_steps() == 4
    with pytest.raises(ValueError, match="`table`"):
        ledger_lib.segments_from_table(np.full((1, 8), 0.5))


def _checkpointed(directory, seed=0):
    private = _private(dense_model(seed=seed))
    return private, checkpointing.DPCheckpoint(str(directory), private)


def _continue_the_checkpoint_segment(ledger, uid):
    """What an adopted uid did: the checkpoint's segment becomes the ledger's own."""
    root = ledger.root()
    root._base.pop(uid, None)
    root.uid = uid


@pytest.mark.parametrize("power_check", [False, True])
def test_every_restore_of_a_dp_checkpoint_counts_its_updates_apart(
    power_check, tmp_path, monkeypatch
):
    original, ckpt = _checkpointed(tmp_path / "ckpt")
    _train(original, 3)
    ckpt.save()
    uid = original.privacy_ledger.uid
    original_file = str(tmp_path / "original.weights.h5")
    original.save_weights(original_file)
    del original, ckpt
    gc.collect()  # the original run is over (as after a preemption)
    # The resumed run: the checkpoint's segment as a base one, its own apart.
    resumed, resumed_ckpt = _checkpointed(tmp_path / "ckpt", seed=1)
    assert resumed_ckpt.restore() == 3
    assert resumed.privacy_ledger.uid != uid
    if power_check:  # the former design: the first restore took the uid
        _continue_the_checkpoint_segment(resumed.privacy_ledger, uid)
    _train(resumed, 2)
    resumed.load_weights(original_file)  # a snapshot of the shared segment
    assert resumed.privacy_ledger.total_steps() == 5
    resumed_file = str(tmp_path / "resumed.weights.h5")
    resumed.save_weights(resumed_file)
    del resumed, resumed_ckpt
    gc.collect()
    # A copy of the same warm start restored elsewhere: nothing tells it from
    # a first restore.
    fork, fork_ckpt = _checkpointed(tmp_path / "ckpt", seed=2)
    assert fork_ckpt.restore() == 3
    if power_check:
        _continue_the_checkpoint_segment(fork.privacy_ledger, uid)
    _train(fork, 2)
    # The resumed run's final weights, beside the fork's: 3 + 2 + 2 updates.
    resumed_model = dense_model(seed=3)
    resumed_model.load_weights(resumed_file)
    counted = ledger_lib.ledger_of(resumed_model.weights + fork.weights).total_steps()
    assert counted == (5 if power_check else 7)


def test_a_checkpoint_written_before_segments_is_counted_once(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        # The older format: the total table only, beside the model and each layer.
        patch.setattr(ledger_lib, "_checkpoint_table", lambda ledger: ledger.root().table())
        original, ckpt = _checkpointed(tmp_path)
        _train(original, 3)
        ckpt.save()
    resumed, resumed_ckpt = _checkpointed(tmp_path, seed=1)
    assert resumed_ckpt.restore() == 3
    assert resumed.privacy_ledger.total_steps() == 3


def test_a_restored_checkpoint_of_a_live_run_counts_apart(tmp_path):
    # The run that wrote it still trains in this process.
    original, ckpt = _checkpointed(tmp_path)
    _train(original, 2)
    ckpt.save()
    other, other_ckpt = _checkpointed(tmp_path, seed=1)
    assert other_ckpt.restore() == 2
    assert other.privacy_ledger.uid != original.privacy_ledger.uid
    _train(other, 1)
    _train(original, 1)
    assert other.privacy_ledger.total_steps() == 3
    assert original.privacy_ledger.total_steps() == 3


# ------------------------------------------------------------------ a06
def _dtype_model(dtype=None):
    keras.utils.set_random_seed(7)
    inputs = keras.Input((4,), dtype=dtype)
    hidden = keras.layers.Dense(5, activation="tanh", dtype=dtype)(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, dtype=dtype)(hidden))


def _conv_model():
    """The same network with its first kernel as a 1x1 convolution."""
    keras.utils.set_random_seed(8)
    inputs = keras.Input((1, 1, 4))
    hidden = keras.layers.Conv2D(5, 1, activation="tanh")(inputs)
    hidden = keras.layers.Flatten()(hidden)
    return keras.Model(inputs, keras.layers.Dense(3)(hidden))


def _old_fingerprint(variable):
    import hashlib

    value = np.asarray(variable.numpy())
    digest = hashlib.blake2b(f"{value.dtype}{value.shape}".encode(), digest_size=8)
    digest.update(value.tobytes())
    return int.from_bytes(digest.digest(), "little")


@pytest.mark.parametrize("power_check", [False, True])
def test_weights_copied_into_a_float64_or_reshaped_copy_are_recognised(power_check, monkeypatch):
    if power_check:
        monkeypatch.setattr(ledger_lib, "_fingerprint", _old_fingerprint)
    trained = _private(_dtype_model())
    n = _train(trained, 4)
    weights = trained.get_weights()

    def counted(model, values):
        model.set_weights(values)
        return tan_keras.make_private(model, **DP).privacy_ledger.total_steps()

    control = counted(_dtype_model(), weights)
    wide = counted(_dtype_model("float64"), [w.astype(np.float64) for w in weights])
    # Only the first kernel copied, as a 1x1 convolution kernel.
    conv = _conv_model()
    reshaped = counted(conv, [weights[0].reshape(1, 1, 4, 5), *conv.get_weights()[1:]])
    assert control == n
    if power_check:
        assert wide == reshaped == 0
        return
    assert wide == reshaped == n
    # Other values (one ulp away, or a lossy cast) are not these weights.
    nudged = [np.nextafter(w, np.float32(np.inf)) for w in weights]
    assert counted(_dtype_model(), nudged) == 0
    half = [w.astype(np.float16).astype(np.float64) for w in weights]
    assert counted(_dtype_model("float64"), half) == 0
