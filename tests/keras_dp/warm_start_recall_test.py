"""Warm starts a callback makes mid-fit are recalled before the next update (escape a18).

A callback that copies another privately trained model's weights into the
model being trained (`self.model.set_weights(other.get_weights())`) at
`on_train_batch_begin` (first batch or a later one) or at a later epoch's
`on_epoch_begin` was not looked up: only `on_train_begin` and the first
`on_epoch_begin` were. Measured before the fix: a ledger of 8 updates where
the weights went through 4 + 8 = 12. Now, whenever a user callback runs
code between updates, the weights a callback changed are looked up
(`ledger.recall`) after its hooks and before the next update, the budget
cap is set again from the merged counts, and a Poisson fit whose pipeline
has drawn ahead stops with a clear error. A fit whose callbacks run no code
between updates looks nothing up per batch.

Every test has a power check: the same scenario with the mid-fit look (or
the cap's refresh) disabled fails it.
"""

import warnings

import keras
import numpy as np
import pytest
from _helpers import LOSS, dense_model

import tan_keras
from tan_keras.keras_dp import dp_state
from tan_keras.keras_dp import ledger as ledger_lib
from tan_keras.keras_dp.callbacks import PrivacyAccountant
from tan_keras.mechanism import sampling

N, B = 64, 16
DELTA = 1e-5
DP = dict(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=B, dataset_size=N)
STEPS = 4  # updates per epoch: N / B shuffled batches, or padded Poisson steps


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(N, 4)).astype(np.float32), rng.integers(0, 3, N).astype(np.int32)


def _private(seed=0, **overrides):
    private = tan_keras.make_private(dense_model(seed=seed), **{**DP, **overrides})
    private.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    return private


def _fit(private, epochs=1, callbacks=(), seed=None):
    x, y = _data()
    if private.dp_config.sampling == "shuffled":
        private.fit(x, y, batch_size=B, epochs=epochs, verbose=0, callbacks=list(callbacks))
        return
    # pad_steps: every step is one micro-batch, so an epoch runs STEPS updates.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a seeded sampler is warned not private
        sampler = sampling.PoissonSampler(N, B, physical_batch_size=N, pad_steps=True, seed=seed)
    private.fit(
        sampling.make_poisson_dataset(x, y, sampler),
        steps_per_epoch=STEPS,
        epochs=epochs,
        verbose=0,
        callbacks=list(callbacks),
    )


class _WarmStart(keras.callbacks.Callback):
    """Copies `weights` into the model once, at `hook` called with index `at`."""

    def __init__(self, weights, hook, at):
        super().__init__()
        self._weights, self._at, self._done = weights, at, False
        setattr(self, hook, self._set)

    def _set(self, index, logs=None):
        if index == self._at and not self._done:
            self._done = True
            self.model.set_weights(self._weights)


WHERE = [("on_train_batch_begin", 0), ("on_train_batch_begin", 2), ("on_epoch_begin", 1)]


def _no_mid_fit_look(monkeypatch):
    # The former fit: looked up at on_train_begin and the first on_epoch_begin only.
    monkeypatch.setattr(dp_state.WeightsRecall, "_look", lambda self, where: None)


@pytest.mark.parametrize("power_check", [False, True])
@pytest.mark.parametrize("hook,at", WHERE)
def test_a_warm_start_mid_fit_counts_the_source_updates(hook, at, power_check, monkeypatch):
    if power_check:
        _no_mid_fit_look(monkeypatch)
    source = _private(sampling="shuffled")
    _fit(source)
    assert source.privacy_ledger.total_steps() == STEPS
    private = _private(seed=1, sampling="shuffled")
    _fit(private, epochs=2, callbacks=[_WarmStart(source.get_weights(), hook, at)])
    own = 2 * STEPS
    steps, epochs = private.privacy_ledger.total_steps(), int(private.dp_epochs.numpy())
    if power_check:
        assert (steps, epochs) == (own, 2)  # the source's updates lost
    else:
        assert (steps, epochs) == (STEPS + own, 3)
        assert int(private.dp_steps.numpy()) == STEPS + own


@pytest.mark.parametrize("power_check", [False, True])
def test_a_poisson_warm_start_at_the_first_batch_resumes_the_pipeline(power_check, monkeypatch):
    if power_check:
        _no_mid_fit_look(monkeypatch)
    source = _private()
    _fit(source)
    private = _private(seed=1)
    _fit(private, epochs=2, callbacks=[_WarmStart(source.get_weights(), "on_train_batch_begin", 0)])
    # Nothing was read before the first batch: the sampler resumes at the
    # merged position and every step passes the identity check.
    expected = 2 * STEPS if power_check else STEPS + 2 * STEPS
    assert private.privacy_ledger.total_steps() == expected
    assert int(private.sampling_position.numpy()) == expected


@pytest.mark.parametrize("power_check", [False, True])
@pytest.mark.parametrize("hook,at,own", [("on_train_batch_begin", 2, 2), ("on_epoch_begin", 1, 4)])
def test_a_poisson_warm_start_after_the_pipeline_drew_ahead_stops_the_fit(
    hook, at, own, power_check, monkeypatch
):
    if power_check:
        _no_mid_fit_look(monkeypatch)
    source = _private()
    _fit(source)
    copied = source.get_weights()
    private = _private(seed=1)
    warm_start = _WarmStart(copied, hook, at)
    if power_check:
        _fit(private, epochs=2, callbacks=[warm_start])
        assert private.privacy_ledger.total_steps() == 2 * STEPS  # the source's updates lost
        return
    with pytest.raises(ValueError, match=r"Invalid weights set by a callback.*drawn its steps"):
        _fit(private, epochs=2, callbacks=[warm_start])
    # Merged before any update used the copy, and no update after it.
    assert private.privacy_ledger.total_steps() == STEPS + own
    for value, source_value in zip(private.get_weights(), copied):
        np.testing.assert_array_equal(value, source_value)


# The budget: B alone could run all its updates within it, B after the
# source (another mechanism, one epoch) cannot. Epsilons at delta=1e-5:
# Poisson source sigma 0.7, 4 steps: 8.95; + 8 of B's: 10.3 (B alone: 6.3).
# Shuffled source sigma 0.8, 1 epoch: 14.1; + 1 epoch of B's: 19.4 (B alone:
# 10.7; a second epoch of B's is refused either way).
BUDGETS = {"poisson": (0.7, 9.5), "shuffled": (0.8, 15.0)}


@pytest.mark.parametrize("power_check", [False, True])
@pytest.mark.parametrize("kind", ["poisson", "shuffled"])
def test_the_budget_stop_sees_the_merged_count(kind, power_check, monkeypatch):
    if power_check:  # the cap set at on_train_begin, from the counts of before
        monkeypatch.setattr(PrivacyAccountant, "ledger_changed", lambda self, **kwargs: None)
    source_sigma, target = BUDGETS[kind]
    source = _private(sampling=kind, noise_multiplier=source_sigma)
    _fit(source)
    private = _private(seed=1, sampling=kind)
    accountant = PrivacyAccountant(DELTA, target_epsilon=target)
    warm_start = _WarmStart(source.get_weights(), "on_train_batch_begin", 0)
    _fit(private, epochs=2, callbacks=[accountant, warm_start])
    epsilon = private.privacy_ledger.epsilon(DELTA)
    if power_check:
        assert epsilon > target
    else:
        assert epsilon <= target
        assert len(private.privacy_ledger.entries()) == 2  # the source's mechanism merged


@pytest.mark.parametrize("power_check", [False, True])
def test_a_run_repeating_another_s_seeds_takes_not_its_history_mid_fit(power_check, monkeypatch):
    # B produces A's values itself (same seeds): only values a callback
    # changed are looked up mid-fit, not those B's own updates left.
    if power_check:  # every weight looked up at every look
        monkeypatch.setattr(
            dp_state.WeightsRecall,
            "_look",
            lambda self, where: self._merged(
                lambda ledger: ledger_lib.recall(self._private, ledger), where
            ),
        )

    def run(callbacks=()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a seeded run is warned not private
            private = _private(noise_seed=3)
        _fit(private, epochs=2, callbacks=callbacks, seed=4)
        return private

    first = run()
    idle = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: None)
    if power_check:
        # At the second epoch B holds A's first-epoch values: their history is
        # merged and the Poisson position moves under the pipeline.
        with pytest.raises(ValueError, match="Invalid weights set by a callback"):
            run([idle])
        return
    second = run([idle])
    for value, first_value in zip(second.get_weights(), first.get_weights()):
        np.testing.assert_array_equal(value, first_value)
    assert second.privacy_ledger.total_steps() == 2 * STEPS


class _CountingRecall:
    def __init__(self, monkeypatch):
        self.calls = 0
        real = ledger_lib.recall

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(ledger_lib, "recall", counted)


@pytest.mark.parametrize("power_check", [False, True])
def test_a_fit_without_user_code_between_updates_looks_nothing_up_per_batch(
    power_check, monkeypatch
):
    private = _private()
    counter = _CountingRecall(monkeypatch)
    # Keras's own callbacks (a batch hook here) run no code that could set the weights.
    callbacks = [keras.callbacks.ProgbarLogger()]
    if power_check:  # a user batch hook: a look before every batch
        callbacks.append(keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: None))
    _fit(private, epochs=2, callbacks=callbacks)
    # fit's start, on_train_begin and the first on_epoch_begin.
    if power_check:
        assert counter.calls >= 3 + 2 * STEPS
    else:
        assert counter.calls == 3
