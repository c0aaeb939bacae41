"""The privacy ledger belongs to the weights, not to the wrapper that trains them.

Attacks (each an ordinary Keras habit that used to under-report epsilon):
a second `make_private` over the same model started a second ledger at 0
while both trained the same variables; `BackupAndRestore`, weight files and
`tf.train.Checkpoint` restored weights into a fresh model whose ledger
started at 0. Every test has a power check: the same scenario with the
ledger kept on the wrapper (or left out of the files) fails it.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from _helpers import LOSS, dense_model

import tan_keras
from tan_keras.keras_dp import ledger as ledger_lib
from tan_keras.keras_dp import step_identity
from tan_keras.keras_dp.callbacks import PrivacyAccountant
from tan_keras.mechanism import sampling
from tan_keras.privacy import accounting, releases

N, B, DELTA = 64, 8, 1e-5
DP = dict(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=B, dataset_size=N)


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(N, 4)).astype(np.float32), rng.integers(0, 3, N).astype(np.int32)


def _private(model, **kwargs):
    private = tan_keras.make_private(model, **{**DP, **kwargs})
    private.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    return private


def _train(private, steps, callbacks=(), epochs=1):
    x, y = _data()
    config = private.dp_config
    # The default physical batch holds a whole step with probability 1 - 3e-5;
    # pad_steps makes every step exactly one micro-batch here.
    sampler = sampling.PoissonSampler(
        config.dataset_size, config.expected_batch_size, physical_batch_size=N, pad_steps=True
    )
    ds = sampling.make_poisson_dataset(x, y, sampler)
    private.fit(ds, steps_per_epoch=steps, epochs=epochs, verbose=0, callbacks=list(callbacks))


def _epsilon(private):
    accountant = PrivacyAccountant(delta=DELTA)
    accountant.set_model(private)
    return accountant.epsilon()


def _fresh_ledgers(monkeypatch):
    """The bug: every private model starts a ledger of its own."""
    monkeypatch.setattr(ledger_lib, "ledger_of", lambda objects: None)
    monkeypatch.setattr(ledger_lib, "recall", lambda model, ledger: {})


@pytest.mark.parametrize("power_check", [False, True])
def test_a_second_make_private_shares_the_ledger(power_check, monkeypatch):
    if power_check:
        _fresh_ledgers(monkeypatch)
    model = dense_model()
    first = _private(model)
    _train(first, 20)
    second = _private(model)
    _train(second, 20)
    spent = accounting.compute_epsilon(1.0, B / N, 40, DELTA)
    if power_check:
        assert int(second.dp_steps.numpy()) == 20
        assert _epsilon(second) < 0.9 * spent
        return
    assert int(second.dp_steps.numpy()) == int(first.dp_steps.numpy()) == 40
    assert _epsilon(second) == pytest.approx(spent)
    assert second.privacy_ledger is first.privacy_ledger


def test_a_second_phase_with_other_settings_composes_with_the_first():
    model = dense_model()
    first = _private(model)
    _train(first, 20)
    second = _private(model, noise_multiplier=2.0, expected_batch_size=2 * B)
    _train(second, 10)
    entries = second.privacy_ledger.entries()
    assert sorted((e.mechanism.noise_multiplier, e.steps) for e in entries) == [
        (1.0, 20),
        (2.0, 10),
    ]
    alone = accounting.compute_epsilon(2.0, 2 * B / N, 10, DELTA)
    composed = releases.composed_epsilon(entries, DELTA)
    assert _epsilon(second) == pytest.approx(composed)
    assert composed > alone + 0.5 * accounting.compute_epsilon(1.0, B / N, 20, DELTA)


def test_a_model_built_on_a_privately_trained_base_inherits_its_ledger():
    base = dense_model()
    first = _private(base)
    _train(first, 15)
    # Transfer learning: a new head on the privately trained layers.
    head = keras.layers.Dense(2)(base.layers[-2].output)
    transfer = _private(keras.Model(base.inputs, head))
    assert int(transfer.dp_steps.numpy()) == 15
    _train(transfer, 5)
    assert _epsilon(transfer) == pytest.approx(accounting.compute_epsilon(1.0, B / N, 20, DELTA))


def test_the_step_budget_counts_the_earlier_phase():
    model = dense_model()
    first = _private(model)
    _train(first, 20)
    target = accounting.compute_epsilon(1.0, B / N, 30, DELTA)
    second = _private(model)
    accountant = PrivacyAccountant(delta=DELTA, target_epsilon=target)
    _train(second, 40, callbacks=[accountant])
    assert int(second.dp_steps.numpy()) == 30
    assert accountant.epsilon() <= target


def test_two_growing_ledgers_are_not_merged():
    a, b = dense_model(seed=1), dense_model(seed=2)
    first, second = _private(a), _private(b)
    _train(first, 2)
    _train(second, 2)
    inputs = keras.Input((4,))
    both = keras.Model(inputs, keras.layers.Add()([a(inputs), b(inputs)]))
    with pytest.raises(ValueError, match="two models that are trained privately"):
        tan_keras.make_private(both, **DP)
    assert first.dp_steps is not second.dp_steps  # both still alive


def test_poisson_and_shuffled_training_of_the_same_weights_is_refused():
    model = dense_model()
    first = _private(model)
    _train(first, 2)
    with pytest.raises(ValueError, match="`sampling`"):
        _private(model, sampling="shuffled")


# ------------------------------------------------------ across weight files
def _saved_and_restored(how, trained, base, tmp_path):
    """Restores `trained`'s weights (it wraps `base`) into a fresh private model."""
    fresh_base = dense_model(seed=5)
    fresh = _private(fresh_base)
    if how == "save_weights":
        path = str(tmp_path / "w.weights.h5")
        trained.save_weights(path)
        fresh.load_weights(path)
    elif how == "wrapped_model_files":
        # The wrapped Keras model's own file, loaded after make_private.
        path = str(tmp_path / "base.weights.h5")
        base.save_weights(path)
        fresh_base.load_weights(path)
    elif how == "keras_file":
        path = str(tmp_path / "m.keras")
        trained.save(path)
        fresh = keras.models.load_model(path)
    elif how in ("model_checkpoint", "model_checkpoint_weights"):
        weights_only = how == "model_checkpoint_weights"
        path = str(tmp_path / ("c.weights.h5" if weights_only else "c.keras"))
        callback = keras.callbacks.ModelCheckpoint(path, save_weights_only=weights_only)
        _train(trained, 3, callbacks=[callback])
        if weights_only:
            fresh.load_weights(path)
        else:
            fresh = keras.models.load_model(path)
    elif how == "tf_checkpoint":
        path = tf.train.Checkpoint(model=trained).write(str(tmp_path / "tf" / "ckpt"))
        tf.train.Checkpoint(model=fresh).read(path).assert_existing_objects_matched()
    return fresh


HOWS = [
    "save_weights",
    "wrapped_model_files",
    "keras_file",
    "model_checkpoint",
    "model_checkpoint_weights",
    "tf_checkpoint",
]


@pytest.mark.parametrize("how", HOWS)
def test_weights_restored_in_a_fresh_model_bring_their_ledger(how, tmp_path):
    base = dense_model()
    trained = _private(base)
    _train(trained, 12)
    fresh = _saved_and_restored(how, trained, base, tmp_path)
    spent = int(trained.dp_steps.numpy())
    assert spent >= 12
    assert int(fresh.dp_steps.numpy()) == spent
    assert _epsilon(fresh) == pytest.approx(_epsilon(trained))


@pytest.mark.parametrize("how", ["save_weights", "keras_file", "tf_checkpoint"])
def test_power_check_files_without_the_ledger_restart_at_zero(how, tmp_path, monkeypatch):
    monkeypatch.setattr(ledger_lib._LedgerSaveable, "save_own_variables", lambda self, store: None)
    monkeypatch.setattr(
        ledger_lib._LedgerTensors,
        "_serialize_to_tensors",
        lambda self: {"table": tf.zeros([0, releases.TABLE_COLUMNS], tf.float64)},
    )
    base = dense_model()
    trained = _private(base)
    _train(trained, 12)
    fresh = _saved_and_restored(how, trained, base, tmp_path)
    assert int(fresh.dp_steps.numpy()) == 0


@pytest.mark.parametrize("how", ["load_weights", "tf_checkpoint", "wrapped_model"])
def test_restoring_older_weights_keeps_the_ledger(how, tmp_path):
    base = dense_model()
    private = _private(base)
    _train(private, 5)
    if how == "tf_checkpoint":
        path = tf.train.Checkpoint(model=private).write(str(tmp_path / "tf" / "ckpt"))
    else:
        path = str(tmp_path / "old.weights.h5")
        (base if how == "wrapped_model" else private).save_weights(path)
    older = [v.numpy() for v in private.trainable_variables]
    _train(private, 5)
    if how == "tf_checkpoint":
        tf.train.Checkpoint(model=private).read(path)
    else:
        (base if how == "wrapped_model" else private).load_weights(path)
    np.testing.assert_array_equal(private.trainable_variables[0].numpy(), older[0])
    assert int(private.dp_steps.numpy()) == 10


def test_backup_and_restore_after_a_preemption_keeps_counting(tmp_path):
    """Keras's preemption recovery: a fresh model restores the backup and goes on."""
    backup = str(tmp_path / "backup")

    class Preempted(Exception):
        pass

    class PreemptAfterEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise Preempted()

    first = _private(dense_model())
    with pytest.raises(Preempted):
        _train(
            first,
            5,
            callbacks=[keras.callbacks.BackupAndRestore(backup), PreemptAfterEpoch()],
            epochs=4,
        )
    assert int(first.dp_steps.numpy()) == 10
    # The restarted job: a new model object, new variables, the same backup.
    restarted = _private(dense_model(seed=9))
    _train(restarted, 5, callbacks=[keras.callbacks.BackupAndRestore(backup)], epochs=4)
    # Epochs 0 and 1 were backed up; 2 and 3 run again after the restart.
    assert int(restarted.dp_steps.numpy()) == 20
    assert _epsilon(restarted) == pytest.approx(accounting.compute_epsilon(1.0, B / N, 20, DELTA))


def test_get_weights_and_the_layers_do_not_list_the_ledger():
    model = dense_model()
    private = _private(model)
    assert len(private.get_weights()) == len(model.get_weights())
    assert not any("ledger" in v.path for v in private.weights)
    assert not any("ledger" in layer.name for layer in private.layers)


def test_a_file_from_another_version_of_the_ledger_is_refused(tmp_path):
    with pytest.raises(ValueError, match="`table`"):
        ledger_lib.PrivacyLedger().merge_table(np.full((1, releases.TABLE_COLUMNS), 9.0))


@pytest.mark.parametrize("power_check", [False, True])
@pytest.mark.parametrize("copy", ["clone_model", "plain_model", "set_after_make_private"])
def test_weights_copied_as_arrays_bring_their_ledger(copy, power_check, monkeypatch):
    if power_check:
        monkeypatch.setattr(ledger_lib, "recall", lambda model, ledger: {})
    inner = dense_model()
    trained = _private(inner)
    object.__setattr__(trained, "_inner", inner)
    _train(trained, 7)
    weights = trained.get_weights()
    if copy == "clone_model":
        # The Keras habit: clone the model, copy its weights, make it private.
        clone = keras.models.clone_model(trained._inner)
        clone.set_weights(trained._inner.get_weights())
        fresh = _private(clone)
    elif copy == "plain_model":
        plain = dense_model(seed=3)
        plain.set_weights(weights)
        fresh = _private(plain)
    else:
        plain = dense_model(seed=3)
        fresh = _private(plain)
        plain.set_weights(weights)
    _train(fresh, 1)
    assert int(fresh.dp_steps.numpy()) == (1 if power_check else 8)


def test_cloning_a_private_model_says_how_to_copy_it():
    with pytest.raises(ValueError, match="missing: l2_norm_clip.*make_private on the copy"):
        keras.models.clone_model(_private(dense_model()))


def test_a_second_phase_with_other_settings_never_draws_the_first_phases_steps():
    """Phase 2's own count starts at 0, but the sampler's position goes on."""
    model = dense_model()
    first = _private(model)
    x, y = _data()
    sampler = sampling.PoissonSampler(N, B, physical_batch_size=N, pad_steps=True)
    train = sampling.make_poisson_dataset(x, y, sampler)
    first.fit(train, steps_per_epoch=12, verbose=0)
    replay = list(sampling.make_poisson_dataset(x, y, _resumed(sampler, 0), steps=12))
    second = _private(model, noise_multiplier=1.2)
    assert int(second.dp_steps.numpy()) == 0 and int(second.sampling_position.numpy()) == 12
    # Phase 1's steps fed again to phase 2 are replays, whatever its own count.
    with pytest.raises(step_identity.SamplingIdentityError, match="replayed"):
        second.fit(_generator(replay), steps_per_epoch=12, verbose=0)
    # The same pipeline goes on from step 12: new samples.
    second.fit(train, steps_per_epoch=12, verbose=0)
    assert int(second.dp_steps.numpy()) == 12
    assert int(second.sampling_position.numpy()) == int(first.sampling_position.numpy()) == 24


def _resumed(sampler, step):
    twin = sampling.PoissonSampler(
        N,
        B,
        physical_batch_size=sampler.physical_batch_size,
        pad_steps=sampler.pad_steps,
        secret_key=int(sampler.key.numpy()) + 2**63,
    )
    twin.resume_at(step)
    return twin


def _generator(elements):
    def generate():
        yield from (tuple(np.asarray(t) for t in element) for element in elements)

    return generate()


# ------------------------------------------- from the adversarial review's scripts
class _KeepFirstEpoch(keras.callbacks.Callback):
    """keras.io's own-callback pattern: keep the weights of the best (here: first) epoch."""

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            self.weights = self.model.get_weights()
            self.steps = int(self.model.dp_steps.numpy())


@pytest.mark.parametrize("copy", ["ema_weights", "layers_under_a_new_head", "epoch_snapshot"])
def test_weights_copied_in_pieces_or_mid_fit_bring_their_ledger(copy):
    base = dense_model()
    trained = _private(base, ema_decay=0.5)
    keep = _KeepFirstEpoch()
    _train(trained, 5, callbacks=[keep], epochs=2)
    spent = int(trained.dp_steps.numpy())
    if copy == "ema_weights":
        with trained.ema_weights():
            weights = base.get_weights()
        fresh = dense_model(seed=4)
        fresh.set_weights(weights)
    elif copy == "layers_under_a_new_head":
        fresh = dense_model(seed=4, classes=5)
        for old, new in zip(base.layers[:-1], fresh.layers[:-1]):
            new.set_weights(old.get_weights())
    else:
        fresh = dense_model(seed=4)
        fresh.set_weights(keep.weights[: len(base.weights)])
        spent = keep.steps
    private = _private(fresh)
    assert int(private.dp_steps.numpy()) == spent


def test_a_nested_backbones_own_file_brings_its_ledger(tmp_path):
    def build(classes):
        inputs = keras.Input((4,))
        backbone = keras.Model(inputs, keras.layers.Dense(6, activation="tanh")(inputs))
        outer = keras.Input((4,))
        return backbone, keras.Model(outer, keras.layers.Dense(classes)(backbone(outer)))

    backbone, model = build(3)
    trained = _private(model)
    _train(trained, 6)
    path = str(tmp_path / "backbone.weights.h5")
    backbone.save_weights(path)
    # A fresh process: a new head on a new backbone, made private, then loaded.
    fresh_backbone, fresh_model = build(2)
    fresh = _private(fresh_model)
    fresh_backbone.load_weights(path)
    assert int(fresh.dp_steps.numpy()) == 6


def test_legacy_hdf5_files_are_refused_for_private_models(tmp_path):
    private = _private(dense_model())
    for call in (private.save, private.load_weights):
        with pytest.raises(ValueError, match="`filepath`.*legacy HDF5"):
            call(str(tmp_path / "m.h5"))
    checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / "best.h5"))
    with pytest.raises(ValueError, match="`filepath`.*legacy HDF5"):
        _train(private, 2, callbacks=[checkpoint])
    assert int(private.dp_steps.numpy()) == 0


def test_a_dp_checkpoint_resumed_twice_never_gives_two_runs_the_same_noise(tmp_path):
    from tan_keras.keras_dp import checkpointing

    def resumed():
        private = _private(dense_model())
        ckpt = checkpointing.DPCheckpoint(str(tmp_path), private)
        return private, ckpt

    first, ckpt = resumed()
    _train(first, 3)
    ckpt.save()
    key = first.noise_key.numpy().copy()
    fork_a, ckpt_a = resumed()
    ckpt_a.restore(exact_resume=True)
    fork_b, ckpt_b = resumed()
    ckpt_b.restore(exact_resume=True)
    # An exact resume continues the run's noise; the same checkpoint resumed
    # again draws fresh noise (a safety net: by default every restore does).
    np.testing.assert_array_equal(fork_a.noise_key.numpy(), key)
    assert not np.array_equal(fork_b.noise_key.numpy(), key)
    assert int(fork_a.dp_steps.numpy()) == int(fork_b.dp_steps.numpy()) == 3
