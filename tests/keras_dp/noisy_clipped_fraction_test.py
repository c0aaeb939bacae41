"""The privately released clipped fraction (Andrew et al. 2021) and its accounting.

Once per logical step the number b of the step's examples clipped to C gets
Gaussian noise of std s * B and is divided by B: the released fraction has
std s. The update and the count are one Gaussian mechanism, accounted with
sigma_eff = (sigma^-2 + (s B)^-2)^(-1/2).
"""

import json
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from _helpers import (
    LOSS,
    dense_model,
    dp_model,
    micro_batches,
    per_step_values,
    released_fraction_ok,
)

from tan_keras.keras_dp import checkpointing
from tan_keras.keras_dp.callbacks import PrivacyAccountant
from tan_keras.keras_dp.dp_config import DPConfig
from tan_keras.keras_dp.dp_model import DPKerasModel
from tan_keras.mechanism import noise
from tan_keras.privacy import accounting, tan

B, N, STD, DELTA = 8, 100, 0.1, 1e-5
STEPS, MICRO, ROWS = 200, 4, 4  # logical steps, micro-batches per step, rows per micro-batch


def _clipping_everything(**dp_kwargs):
    """A model whose C is so small that every real example counts as clipped."""
    return dp_model(
        dense_model(),
        l2_norm_clip=1e-6,
        noise_multiplier=1.0,
        expected_batch_size=B,
        dataset_size=N,
        clipped_fraction_std=STD,
        **dp_kwargs,
    )


def _released(steps=STEPS):
    """Per-step released fractions and their truth, from one fit of `steps` logical steps.

    C is tiny, so every real example is clipped: the true count of a step is
    its number of real rows, which varies (0 to MICRO * ROWS) around B.
    The fit runs with release_train_metrics=False, validation data and the
    accountant, and also returns what the callbacks saw.
    """
    rng = np.random.default_rng(0)
    real = rng.integers(0, ROWS + 1, steps * MICRO)
    mask = (np.arange(ROWS)[None] < real[:, None]).astype(np.float32)
    x = rng.normal(size=(steps * MICRO, ROWS, 4))
    y = rng.integers(0, 3, (steps * MICRO, ROWS))
    ends = np.tile(np.arange(MICRO) == MICRO - 1, steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the seeded noise's NotPrivateWarning
        model = _clipping_everything(release_train_metrics=False, noise_seed=7)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS, metrics=["accuracy"])
    batch_logs = []
    recorder = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: batch_logs.append(dict(logs))
    )
    history = model.fit(
        micro_batches(x, y, mask, ends, model),
        verbose=0,
        callbacks=[recorder, PrivacyAccountant(delta=DELTA)],
        validation_data=(x[0], y[0]),
    )
    at_step_ends = [logs["noisy_clipped_fraction"] for logs in batch_logs[MICRO - 1 :: MICRO]]
    truth = real.reshape(steps, MICRO).sum(axis=1) / B
    return per_step_values(at_step_ends), truth, history, batch_logs


@pytest.fixture(scope="module")
def released():
    return _released()


def test_released_fraction_has_std_s_and_mean_count_over_b(released):
    values, truth, history, _ = released
    assert len(values) == STEPS
    assert released_fraction_ok(values, truth, STD)
    # The epoch's log is the mean of the steps' released values.
    assert history.history["noisy_clipped_fraction"][-1] == pytest.approx(values.mean(), abs=1e-4)


def test_power_check_fraction_test_rejects_wrong_noise_or_normalization(released):
    values, truth, _, _ = released
    rng = np.random.default_rng(1)
    # Noise added on every micro-batch (MICRO draws per step): std x sqrt(MICRO).
    per_micro_batch = truth + rng.normal(0, STD * np.sqrt(MICRO), STEPS)
    assert not released_fraction_ok(per_micro_batch, truth, STD)
    # Noise calibrated for the fraction, not the count (std s instead of s * B).
    assert not released_fraction_ok(truth + rng.normal(0, STD / B, STEPS), truth, STD)
    # The released values against a count divided by the realized batch size.
    assert not released_fraction_ok(values, np.ones_like(truth), STD)


def test_power_check_count_noise_not_scaled_by_b_fails_the_test(monkeypatch):
    # The same fit with the count's noise std s instead of s * B (the
    # variance 64 times too small: 30 steps are plenty to see it).
    monkeypatch.setattr(
        DPConfig, "clipped_count_noise_std", property(lambda self: self.clipped_fraction_std)
    )
    values, truth, _, _ = _released(steps=30)
    assert not released_fraction_ok(values, truth, STD)


def test_nothing_noiseless_leaves_the_step_but_the_noisy_fraction_does(released):
    _, _, history, batch_logs = released
    assert all(set(logs) == {"noisy_clipped_fraction"} for logs in batch_logs)
    assert set(history.history) == {
        "noisy_clipped_fraction",
        "val_loss",
        "val_accuracy",
        "dp_steps",
        "epsilon",
        "eta",
    }


def test_steps_past_the_step_cap_release_no_fraction():
    model = _clipping_everything()
    model.set_step_limit(1)
    x, y = np.zeros((4, 8, 4)), np.zeros((4, 8))
    model.fit(micro_batches(x, y, np.ones((4, 8)), np.ones(4, bool), model), verbose=0)
    assert int(model.dp_steps.numpy()) == 1
    # 4 steps ended; only the one within the cap released a fraction.
    assert float(model._trackers.noisy_clipped.count.numpy()) == 1.0


def test_count_noise_is_a_stream_of_the_secret_key_apart_from_the_gradient_noise():
    def draws(key, seed_of, size=4000):
        seed = seed_of(tf.constant(key, tf.int64), 5, 0)
        return noise.add_gaussian_noise([tf.zeros([size])], 1.0, seed)[0].numpy()

    def uncorrelated(a, b):  # |r| below 5 standard errors under independence
        return abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(len(a))

    key, other_key = [3, 4], [3, 5]
    count = draws(key, noise.clipped_count_seed)
    # The gradient's first variable draws from fold_in(step_seed, 0).
    assert uncorrelated(count, draws(key, noise.step_seed))
    assert uncorrelated(count, draws(other_key, noise.clipped_count_seed))
    # Power check: the same stream is caught.
    assert not uncorrelated(count, draws(key, noise.clipped_count_seed))


def _model(**dp_kwargs):
    inp = keras.Input((4,))
    kwargs = dict(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=B, dataset_size=N)
    return DPKerasModel(inp, keras.layers.Dense(3)(inp), **{**kwargs, **dp_kwargs})


def test_effective_noise_multiplier_is_andrew_et_al_theorem_1():
    sigma, sigma_b = 1.0, STD * B
    effective = (sigma**-2 + sigma_b**-2) ** -0.5
    config = _model(clipped_fraction_std=STD).dp_config
    assert config.clipped_count_noise_std == pytest.approx(sigma_b)
    assert config.accounted_noise_multiplier == pytest.approx(effective)
    assert accounting.gradient_noise_multiplier(effective, sigma_b) == pytest.approx(sigma)
    off = _model().dp_config
    assert off.clipped_count_noise_std is None and off.accounted_noise_multiplier == 1.0
    assert _model(noise_multiplier=0.0, clipped_fraction_std=STD).dp_config.eta_step == np.inf


def test_accountant_uses_the_effective_noise_multiplier():
    model, plain = _model(clipped_fraction_std=STD), _model()
    q, effective = B / N, model.dp_config.accounted_noise_multiplier
    accountant, plain_accountant = PrivacyAccountant(DELTA), PrivacyAccountant(DELTA)
    accountant.set_model(model)
    plain_accountant.set_model(plain)
    eps = accountant.epsilon(50)
    assert eps == accounting.compute_epsilon(effective, q, 50, DELTA)
    assert eps > plain_accountant.epsilon(50) == accounting.compute_epsilon(1.0, q, 50, DELTA)
    # The step budget and eta too.
    budget = PrivacyAccountant(DELTA, target_epsilon=8.0)
    budget.set_model(model)
    budget.on_train_begin()
    assert budget.step_limit == accounting.calibrate_steps(8.0, effective, q, DELTA)
    assert budget.step_limit < accounting.calibrate_steps(8.0, 1.0, q, DELTA)
    model._advance_ledger(10)
    logs = {}
    accountant.on_epoch_end(0, logs)
    assert logs["eta"] == pytest.approx(tan.eta(effective, q, 10))
    assert logs["epsilon"] == accounting.compute_epsilon(effective, q, 10, DELTA)


@pytest.mark.parametrize("value", [0.0, -0.1, float("nan"), float("inf"), "0.1", True])
def test_bad_clipped_fraction_std_is_refused_by_name(value):
    with pytest.raises(ValueError, match="Invalid value for `clipped_fraction_std`"):
        _model(clipped_fraction_std=value)


def test_clipped_fraction_std_is_refused_with_shuffled_batches():
    with pytest.raises(ValueError, match="`clipped_fraction_std`.*shuffled"):
        _model(clipped_fraction_std=STD, sampling="shuffled")


def test_resume_with_another_clipped_fraction_std_is_refused(tmp_path):
    def checkpoint(std):
        model = _model(clipped_fraction_std=std)
        model.compile(optimizer="sgd", loss=LOSS)
        return checkpointing.DPCheckpoint(str(tmp_path), model)

    checkpoint(STD).save()
    for other in (0.2, None):
        with pytest.raises(checkpointing.CheckpointError, match="another DP configuration"):
            checkpoint(other).restore()
    assert checkpoint(STD).restore() == 0
    # Without a noisy count the fingerprint is the one checkpoints had before
    # the option existed: they still resume.
    keys = ("l2_norm_clip", "noise_multiplier", "expected_batch_size", "dataset_size")
    before = {**{k: getattr(_model().dp_config, k) for k in keys}, "augmult": 1}
    before["sampling"] = "poisson"
    assert checkpointing._fingerprint(_model()) == json.dumps(before, sort_keys=True)


def test_config_and_saved_model_keep_both_options(tmp_path):
    model = _model(clipped_fraction_std=STD, release_train_metrics=False)
    copy = DPKerasModel.from_config(model.get_config())
    assert copy.dp_config == model.dp_config and copy.dp_config.clipped_fraction_std == STD
    assert copy.release_train_metrics is False
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.dp_config == model.dp_config and loaded.release_train_metrics is False
