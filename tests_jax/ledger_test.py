"""The privacy ledger on the JAX backend: bound to the weights, carried by their files.

The ledger is the TensorFlow route's (keras_dp/ledger.py). "A fresh process"
is simulated by forgetting the fingerprints of the values this process saw
(`_REMEMBERED`): what is counted then came from the file alone.
"""

import _jax_helpers as helpers
import keras
import numpy as np
import pytest

import tan_keras
from tan_keras.keras_dp import ledger as ledger_lib
from tan_keras.privacy import releases

ROWS, BATCH = 32, 8
STEPS_PER_EPOCH = ROWS // BATCH
DELTA = 1e-5


def _private(model, sigma=1.0):
    return helpers.private(model, ROWS, batch=BATCH, lr=0.1, noise_multiplier=sigma)


def _trained(epochs=1):
    model = helpers.dense_model()
    dp_model = _private(model)
    x, y = helpers.data(ROWS)
    dp_model.fit(x, y, epochs=epochs, verbose=0)
    return model, dp_model, x, y


def _epsilon(steps, sigma=1.0):
    mechanism = releases.Mechanism("poisson", sigma, ROWS, BATCH)
    return releases.composed_epsilon([releases.LedgerEntry(mechanism, steps)], DELTA, "rdp")


def test_a_second_make_private_counts_on_top_of_the_first():
    model, first, x, y = _trained()
    second = _private(model)
    assert second.privacy_ledger is first.privacy_ledger
    assert int(second.dp_steps) == STEPS_PER_EPOCH
    second.fit(x, y, epochs=1, verbose=0)
    assert int(first.dp_steps) == int(second.dp_steps) == 2 * STEPS_PER_EPOCH
    assert second.privacy_ledger.epsilon(DELTA) == pytest.approx(
        _epsilon(2 * STEPS_PER_EPOCH), rel=1e-9
    )
    # Another noise multiplier is another mechanism: epsilon composes both.
    third = _private(model, sigma=2.0)
    assert int(third.dp_steps) == 0
    assert len(third.privacy_ledger.entries()) == 2
    mechanism = releases.Mechanism("poisson", 2.0, ROWS, BATCH)
    third.privacy_ledger.counters(mechanism).steps.assign_add(1)
    assert third.privacy_ledger.epsilon(DELTA) > _epsilon(2 * STEPS_PER_EPOCH)


def _save_weights(dp_model, path):
    dp_model.save_weights(path / "w.weights.h5")
    ledger_lib._REMEMBERED.clear()  # a fresh process knows only the file
    fresh = helpers.dense_model()
    fresh.load_weights(path / "w.weights.h5")
    return _private(fresh)


def _keras_file(dp_model, path):
    dp_model.save(path / "m.keras")
    ledger_lib._REMEMBERED.clear()
    return keras.saving.load_model(path / "m.keras")


def _copied_arrays(dp_model, path):
    fresh = helpers.dense_model()
    fresh.set_weights(dp_model.get_weights())
    return _private(fresh)


@pytest.mark.parametrize(
    "route, carried",
    [
        (_save_weights, True),
        (_keras_file, True),
        (_copied_arrays, True),
        # Power check: with the load hook off, the weights file brings nothing.
        ("save_weights_without_the_hook", False),
    ],
)
def test_every_way_of_moving_the_weights_brings_the_count(route, carried, tmp_path, monkeypatch):
    _, dp_model, _, _ = _trained()
    if route == "save_weights_without_the_hook":
        monkeypatch.setattr(ledger_lib, "after_loading_each_object", lambda obj, read: None)
        route = _save_weights
    moved = route(dp_model, tmp_path)
    assert int(moved.dp_steps) == (STEPS_PER_EPOCH if carried else 0)
    if carried:
        assert moved.privacy_ledger.epsilon(DELTA) == pytest.approx(_epsilon(STEPS_PER_EPOCH))


class _Preempted(Exception):
    pass


class _PreemptAfterEpoch(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self._epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self._epoch:
            raise _Preempted()


class _PreemptWhenStopped(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if self.model.stop_training:
            raise _Preempted()


@pytest.mark.parametrize("file_has_ledger", [True, False])
def test_backup_and_restore_resumes_with_the_count(file_has_ledger, tmp_path, monkeypatch):
    # Keras's preemption recovery restores the weights and the epoch in a
    # fresh process: the updates before the preemption must stay counted.
    # file_has_ledger=False is the power check (the save hook off).
    if not file_has_ledger:
        monkeypatch.setattr(ledger_lib, "after_saving_each_object", lambda obj, make: None)
        monkeypatch.setattr(ledger_lib._LedgerSaveable, "save_own_variables", lambda s, st: None)
    x, y = helpers.data(ROWS)
    backup = str(tmp_path / "backup")
    first = _private(helpers.dense_model())
    with pytest.raises(_Preempted):
        first.fit(
            x,
            y,
            epochs=3,
            verbose=0,
            callbacks=[keras.callbacks.BackupAndRestore(backup), _PreemptAfterEpoch(1)],
        )
    assert int(first.dp_steps) == 2 * STEPS_PER_EPOCH
    ledger_lib._REMEMBERED.clear()
    restarted = _private(helpers.dense_model())
    restarted.fit(x, y, epochs=3, verbose=0, callbacks=[keras.callbacks.BackupAndRestore(backup)])
    expected = 3 * STEPS_PER_EPOCH if file_has_ledger else STEPS_PER_EPOCH
    assert int(restarted.dp_steps) == expected


def test_the_ledger_entry_is_no_weight():
    _, dp_model, _, _ = _trained()
    assert len(dp_model.get_weights()) == len(helpers.dense_model().get_weights())
    assert isinstance(dp_model.privacy_ledger, ledger_lib.PrivacyLedger)
    # The count reads as an int, and compares as one.
    assert dp_model.dp_steps == STEPS_PER_EPOCH and dp_model.dp_steps != STEPS_PER_EPOCH + 1


def test_plain_training_of_private_weights_is_refused_and_of_copies_carried():
    model, dp_model, x, y = _trained()
    model.compile(keras.optimizers.SGD(0.1), helpers.LOSS)
    with pytest.raises(ValueError, match="private model"):
        model.fit(x, y, epochs=1, verbose=0)
    # A plain copy of the private values, trained further on (public)
    # data: the values it leaves keep the history they came from.
    copy = helpers.dense_model()
    copy.set_weights(dp_model.get_weights())
    copy.compile(keras.optimizers.SGD(0.1), helpers.LOSS)
    copy.fit(x, y, epochs=1, verbose=0)
    assert int(_private(copy).dp_steps) == STEPS_PER_EPOCH


def _with_budget(target_epsilon, epochs):
    return tan_keras.make_private_with_epsilon(
        helpers.dense_model(),
        target_epsilon=target_epsilon,
        delta=DELTA,
        epochs=epochs,
        expected_batch_size=BATCH,
        dataset_size=ROWS,
        examples_per_chunk=4,
        verbose=False,
    )


@pytest.mark.parametrize("capped", [True, False])
def test_the_budget_stops_training_before_an_update_would_pass_it(capped, monkeypatch):
    # capped=False is the power check: without the model's own cap on its
    # Poisson steps, only the accountant's stop_training is left, which
    # Keras reads after a step: a fit started with the budget spent trains.
    if not capped:
        monkeypatch.setattr(tan_keras.DPKerasModel, "set_step_limit", lambda self, steps: None)
    dp_model = _with_budget(2.0, epochs=2)
    dp_model.compile(keras.optimizers.SGD(0.1), helpers.LOSS)
    planned = dp_model.privacy_budget.plan["steps"]
    x, y = helpers.data(ROWS)
    history = dp_model.fit(x, y, epochs=4, verbose=0)
    steps = int(dp_model.dp_steps)
    # Trained the planned updates (at least), and stopped before the one
    # that would pass the budget.
    assert planned <= steps < 4 * STEPS_PER_EPOCH
    one_more = {dp_model.dp_config.mechanism: steps + 1}
    assert (
        dp_model.privacy_ledger.epsilon(DELTA)
        <= 2.0
        < (dp_model.privacy_ledger.epsilon(DELTA, steps=one_more))
    )
    assert history.history["epsilon"][-1] == pytest.approx(dp_model.privacy_ledger.epsilon(DELTA))
    # The budget is spent: another fit trains nothing.
    before = [w.copy() for w in dp_model.get_weights()]
    dp_model.fit(x, y, epochs=1, verbose=0)
    unchanged = all(np.array_equal(a, b) for a, b in zip(before, dp_model.get_weights()))
    assert (int(dp_model.dp_steps) == steps and unchanged) == capped
    assert (dp_model.privacy_ledger.epsilon(DELTA) <= 2.0) == capped


@pytest.mark.parametrize("guarded", [True, False])
def test_a_restored_count_at_the_budget_trains_no_step(guarded, tmp_path, monkeypatch):
    # Keras draws a fit's first step before BackupAndRestore restores the
    # weights and their ledger, and reads stop_training only after a step.
    # guarded=False (the guard off) is the power check: the step drawn first
    # runs although the restored count is at the budget.
    from tan_keras.jax_dp import step_count

    if not guarded:
        monkeypatch.setattr(step_count.CapGuard, "on_train_batch_begin", lambda *a, **k: None)
    x, y = helpers.data(ROWS)
    backup = str(tmp_path / "backup")
    first = _with_budget(2.0, epochs=2)
    first.compile(keras.optimizers.SGD(0.1), helpers.LOSS)
    # The job is preempted right after the budget stopped it (the backup of
    # that epoch written): the restarted job restores the spent budget.
    with pytest.raises(_Preempted):
        first.fit(
            x,
            y,
            epochs=4,
            verbose=0,
            callbacks=[keras.callbacks.BackupAndRestore(backup), _PreemptWhenStopped()],
        )
    spent = int(first.dp_steps)
    assert spent >= first.privacy_budget.plan["steps"]
    ledger_lib._REMEMBERED.clear()
    restarted = _with_budget(2.0, epochs=2)
    restarted.compile(keras.optimizers.SGD(0.1), helpers.LOSS)
    restarted.fit(x, y, epochs=8, verbose=0, callbacks=[keras.callbacks.BackupAndRestore(backup)])
    assert (int(restarted.dp_steps) == spent) == guarded
    assert (restarted.privacy_ledger.epsilon(DELTA) <= 2.0) == guarded
