"""The privacy ledger only moves forward: no weight restore rewinds it.

Attacks: Keras habits that restore weights (EarlyStopping with
restore_best_weights, set_weights, load_weights, restoring an older
checkpoint) used to rewind `dp_steps`, an ordinary weight. The accountant
then reported less epsilon than was spent, and the next updates reused the
noise of steps already released: two released updates with the same noise
let anyone subtract it.
"""

import keras
import numpy as np
import pytest
from _helpers import dense_model, dp_model, flat, micro_batches

from tan_keras.keras_dp import checkpointing
from tan_keras.keras_dp.callbacks import PrivacyAccountant
from tan_keras.mechanism import sampling

N, B = 64, 8
NOISY = dict(l2_norm_clip=1.0, noise_multiplier=2.0, expected_batch_size=B, dataset_size=N)


def _model(**kwargs):
    return dp_model(dense_model(inputs=30, hidden=40), lr=1.0, **{**NOISY, **kwargs})


def _pure_noise_step(model):
    """One logical step on an all-padding micro-batch: the update is the noise."""
    x = np.zeros((1, 4, 30), np.float32)
    ds = micro_batches(x, np.zeros((1, 4)), np.zeros((1, 4)), [True], model)
    before = flat(model.get_weights())
    model.fit(ds, verbose=0)
    return flat(model.get_weights()) - before


def _rewind_then_step(model, rewind):
    start = model.get_weights()
    first = _pure_noise_step(model)
    rewind(model, start)
    second = _pure_noise_step(model)
    return first, second


def _set_weights(model, start, directory):
    model.set_weights(start)


def _load_weights(model, start, directory):
    path = str(directory / "w.weights.h5")
    current = model.get_weights()
    model.set_weights(start)
    model.save_weights(path)
    model.set_weights(current)
    model.load_weights(path)


@pytest.mark.parametrize("rewind", [_set_weights, _load_weights], ids=["set", "load"])
def test_restoring_weights_neither_rewinds_steps_nor_reuses_noise(rewind, tmp_path):
    model = _model()
    first, second = _rewind_then_step(model, lambda m, w: rewind(m, w, tmp_path))
    assert int(model.dp_steps.numpy()) == 2
    corr = np.corrcoef(first, second)[0, 1]
    assert abs(corr) < 5 / np.sqrt(first.size), corr


def test_power_check_a_rewound_ledger_reuses_the_noise():
    model = _model()

    def rewind_everything(model, start):
        model.set_weights(start)
        model.dp_steps.assign(0)  # what restoring dp_steps as a weight did

    first, second = _rewind_then_step(model, rewind_everything)
    assert np.corrcoef(first, second)[0, 1] > 0.999


def test_early_stopping_restore_best_weights_keeps_the_spent_steps():
    model = dp_model(dense_model(), lr=0.5, **{**NOISY, "noise_multiplier": 1.0})
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(N, 4)).astype(np.float32), rng.integers(0, 3, N)
    ds = sampling.make_poisson_dataset(x, y, sampling.PoissonSampler(N, B))
    accountant = PrivacyAccountant(delta=1e-5)
    # mode="min" on epsilon: every epoch after the first is "worse", so
    # Keras stops and restores the weights of epoch 1.
    stopper = keras.callbacks.EarlyStopping(
        monitor="epsilon", mode="min", patience=1, restore_best_weights=True
    )
    model.fit(ds, epochs=6, steps_per_epoch=8, verbose=0, callbacks=[accountant, stopper])
    assert stopper.stopped_epoch > 0  # the restore really happened
    spent = int(model.dp_steps.numpy())
    assert spent == accountant.history[-1]["dp_steps"] > 0
    assert accountant.epsilon() == pytest.approx(accountant.history[-1]["epsilon"])


def test_a_saved_model_carries_the_spent_steps_after_a_restore(tmp_path):
    model = _model()
    start = model.get_weights()
    for _ in range(3):
        _pure_noise_step(model)
    model.set_weights(start)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert int(loaded.dp_steps.numpy()) == 3


def _checkpointed(directory):
    model = _model()
    sampler = sampling.PoissonSampler(N, B)
    return model, sampler, checkpointing.DPCheckpoint(str(directory), model, sampler)


def test_restoring_an_older_checkpoint_keeps_the_ledger(tmp_path):
    model, sampler, ckpt = _checkpointed(tmp_path)
    _pure_noise_step(model)
    older = ckpt.save()
    weights_then = flat(model.get_weights())
    _pure_noise_step(model)
    _pure_noise_step(model)
    ckpt.save()
    # In this process: the weights come back, the ledger stays at 3.
    assert ckpt.restore(older) == 3
    np.testing.assert_array_equal(flat(model.get_weights()), weights_then)
    assert int(model.dp_steps.numpy()) == 3 and int(sampler.next_step.numpy()) == 3
    # In a fresh process restoring the older file: the newer checkpoint says 3.
    fresh, fresh_sampler, fresh_ckpt = _checkpointed(tmp_path)
    assert fresh_ckpt.restore(older) == 3
    assert int(fresh.dp_steps.numpy()) == 3 and int(fresh_sampler.next_step.numpy()) == 3


def test_the_ledger_is_no_model_weight():
    model = _model()
    names = [v.name for v in model.weights]
    assert not any("dp_steps" in n for n in names), names


def test_a_refused_checkpoint_leaves_the_ledger_where_it_was(tmp_path):
    other = dp_model(dense_model(inputs=30, hidden=40), lr=1.0, **{**NOISY, "dataset_size": 2 * N})
    foreign = checkpointing.DPCheckpoint(str(tmp_path), other, sampling.PoissonSampler(2 * N, B))
    foreign.save()  # another N, at step 0: restoring it first rewrites dp_steps to 0
    model, _, ckpt = _checkpointed(tmp_path)
    _pure_noise_step(model)
    with pytest.raises(checkpointing.CheckpointError, match="another DP configuration"):
        ckpt.restore()
    assert int(model.dp_steps.numpy()) == 1


def test_shuffled_epochs_travel_with_checkpoints_and_saved_models(tmp_path):
    # The per-epoch accounting of sampling="shuffled" depends on dp_epochs:
    # a resume that lost it would report the epsilon of the new epochs only.
    def shuffled():
        model = dp_model(dense_model(), **{**NOISY, "sampling": "shuffled"})
        return model, checkpointing.DPCheckpoint(str(tmp_path / "ckpt"), model)

    model, ckpt = shuffled()
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(N, 4)).astype(np.float32), rng.integers(0, 3, N)
    model.fit(x, y, batch_size=B, epochs=2, verbose=0)
    ckpt.save()
    resumed, resumed_ckpt = shuffled()
    assert resumed_ckpt.restore() == 2 * N // B
    assert int(resumed.dp_epochs.numpy()) == 2
    model.save(str(tmp_path / "m.keras"))
    assert int(keras.models.load_model(str(tmp_path / "m.keras")).dp_epochs.numpy()) == 2
