"""Updates on caller-drawn micro-batches stay marked unchecked wherever the weights go.

Attack (review round 8, "23_caller_poisson_flag_lost"): weights trained with
sampling="caller_poisson" (logged `unchecked_sampling: 1`) copied into a
model with the default sampling (`set_weights`, a weight file, a second
`make_private`) and trained on: the ledger counted those updates exactly
like checked Poisson ones, so the copy's epsilon read as if every update had
been checked and the flag was gone. The ledger now counts them as a
mechanism of their own (`Mechanism.unchecked`), which survives copies,
files and merges; the power checks show the flag lost when the ledger does
not tell them apart.
"""

import dataclasses

import keras
import numpy as np
import pytest
from _helpers import LOSS, dense_model, micro_batches

import tan_keras
from tan_keras.keras_dp import dp_config as dp_config_lib
from tan_keras.keras_dp import ledger as ledger_lib
from tan_keras.keras_dp.callbacks import PrivacyAccountant
from tan_keras.mechanism import sampling
from tan_keras.privacy import accounting, releases

N, B, DELTA = 64, 8, 1e-5
DP = dict(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=B, dataset_size=N)
CALLER_STEPS, COPY_STEPS = 4, 3


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(N, 4)).astype(np.float32), rng.integers(0, 3, N).astype(np.int32)


def _private(model, **kwargs):
    private = tan_keras.make_private(model, **{**DP, **kwargs})
    private.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    return private


def _caller_trained():
    """A model trained CALLER_STEPS updates on shuffled fixed batches it drew itself."""
    base = dense_model()
    private = _private(base, sampling="caller_poisson")
    x, y = _data()
    rows = CALLER_STEPS * B
    ds = micro_batches(
        x[:rows].reshape(CALLER_STEPS, B, 4),
        y[:rows].reshape(CALLER_STEPS, B),
        np.ones((CALLER_STEPS, B)),
        [True] * CALLER_STEPS,
    )
    accountant = PrivacyAccountant(delta=DELTA)
    private.fit(ds, epochs=1, verbose=0, callbacks=[accountant])
    assert accountant.history[-1]["unchecked_sampling"] == 1
    return base, private


def _train_checked(private):
    """COPY_STEPS checked Poisson updates; returns the accountant's last record."""
    x, y = _data()
    sampler = sampling.PoissonSampler(N, B, physical_batch_size=N, pad_steps=True)
    accountant = PrivacyAccountant(delta=DELTA)
    private.fit(
        sampling.make_poisson_dataset(x, y, sampler),
        steps_per_epoch=COPY_STEPS,
        epochs=1,
        verbose=0,
        callbacks=[accountant],
    )
    return accountant.history[-1]


def _unchecked_steps(private):
    return sum(e.steps for e in private.privacy_ledger.entries() if e.mechanism.unchecked)


def _not_distinguished(monkeypatch):
    """The bug: caller_poisson updates counted as the checked Poisson mechanism."""
    mechanism = dp_config_lib.DPConfig.mechanism.fget
    monkeypatch.setattr(
        dp_config_lib.DPConfig,
        "mechanism",
        property(lambda config: dataclasses.replace(mechanism(config), unchecked=False)),
    )


def _copy_by_set_weights(base, tmp_path, monkeypatch):
    copy = dense_model(seed=9)
    copy.set_weights(base.get_weights())
    return copy


def _copy_by_weights_file(base, tmp_path, monkeypatch):
    path = str(tmp_path / "caller.weights.h5")
    base.save_weights(path)
    # Only the file may carry the history: no fingerprint of the trained values.
    monkeypatch.setattr(ledger_lib, "_REMEMBERED", {})
    copy = dense_model(seed=9)
    copy.load_weights(path)
    return copy


def _same_weights(base, tmp_path, monkeypatch):
    return base  # a second make_private over the same variables


@pytest.mark.parametrize("power_check", [False, True])
@pytest.mark.parametrize(
    "copy", [_copy_by_set_weights, _copy_by_weights_file, _same_weights], ids=lambda f: f.__name__
)
def test_the_copy_keeps_the_unchecked_updates(copy, power_check, tmp_path, monkeypatch):
    if power_check:
        _not_distinguished(monkeypatch)
    base, caller = _caller_trained()
    assert caller.privacy_ledger.unchecked_sampling() is not power_check
    second = _private(copy(base, tmp_path, monkeypatch))
    record = _train_checked(second)
    ledger = second.privacy_ledger
    assert ledger.total_steps() == CALLER_STEPS + COPY_STEPS
    # The same RDP epsilon as CALLER_STEPS + COPY_STEPS Poisson updates: only the name differs.
    spent = accounting.compute_epsilon(1.0, B / N, CALLER_STEPS + COPY_STEPS, DELTA)
    assert record["epsilon"] == pytest.approx(spent)
    if power_check:
        assert "unchecked_sampling" not in record
        assert _unchecked_steps(second) == 0
        return
    assert record["unchecked_sampling"] == 1
    assert ledger.unchecked_sampling()
    assert _unchecked_steps(second) == CALLER_STEPS
    assert int(second.dp_steps.numpy()) == COPY_STEPS  # its own, checked, mechanism
    assert any("sampling unchecked" in line for line in ledger.describe())
    # A copy of the copy, through a file, still says so.
    again = ledger_lib.segments_from_table(ledger_lib.segments_table(ledger.segments()))
    assert sum(s for seg in again.values() for m, (s, _) in seg.items() if m.unchecked) == (
        CALLER_STEPS
    )


def test_a_model_that_never_met_caller_batches_logs_no_flag():
    private = _private(dense_model())
    record = _train_checked(private)
    assert "unchecked_sampling" not in record
    assert not private.privacy_ledger.unchecked_sampling()


def test_tables_keep_the_flag_and_older_tables_still_load():
    checked = releases.Mechanism("poisson", 1.0, N, B)
    unchecked = releases.Mechanism("poisson", 1.0, N, B, unchecked=True)
    assert checked != unchecked
    segments = {5: {checked: (3, 0), unchecked: (4, 0)}}
    assert ledger_lib.segments_from_table(ledger_lib.segments_table(segments)) == segments
    table = releases.to_table([releases.LedgerEntry(unchecked, 4)])
    assert releases.from_table(table) == [releases.LedgerEntry(unchecked, 4)]
    # A row written before unchecked mechanisms existed: kind code 1, checked Poisson.
    older = np.asarray([[1, 1, N, B, 1.0, 7, 0]], np.float64)
    assert releases.from_table(older) == [releases.LedgerEntry(checked, 7)]
    assert not releases.unchecked_sampling(releases.from_table(older))
    assert releases.unchecked_sampling(releases.from_table(table))


def test_unchecked_is_refused_outside_poisson():
    with pytest.raises(ValueError, match="`unchecked`.*kind='poisson'.*Received: unchecked=True"):
        releases.Mechanism("shuffled", 1.0, N, B, unchecked=True)
    with pytest.raises(ValueError, match="`unchecked`.*True or False.*Received: unchecked='yes'"):
        releases.Mechanism("poisson", 1.0, N, B, unchecked="yes")


def test_the_budget_plan_says_earlier_updates_were_unchecked(capsys):
    base, _ = _caller_trained()
    private = tan_keras.make_private_with_epsilon(
        base, target_epsilon=8.0, delta=DELTA, epochs=1, expected_batch_size=B, dataset_size=N
    )
    assert "unchecked_sampling: 1" in private.privacy_budget.describe()
    assert "unchecked_sampling: 1" in capsys.readouterr().out
