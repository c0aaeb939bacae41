"""Online accounting: counts noisy updates, logs epsilon, stops at budget."""

import numpy as np
import pytest
from _helpers import dense_model, dp_model

from tan_keras.keras_dp.callbacks import PrivacyAccountant
from tan_keras.mechanism import sampling
from tan_keras.privacy import accounting

N, B, DELTA = 200, 20, 1e-4


def _fit(accountant, augmult=1, physical=None, sigma=1.5, epochs=3, steps_per_epoch=5):
    model = dp_model(
        dense_model(),
        l2_norm_clip=1.0,
        noise_multiplier=sigma,
        expected_batch_size=B,
        dataset_size=N,
        augmult=augmult,
    )
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(N, 4)).astype(np.float32), rng.integers(0, 3, N)
    sampler = sampling.PoissonSampler(N, B, physical_batch_size=physical)
    ds = sampling.make_poisson_dataset(x, y, sampler, augmult=augmult)
    history = model.fit(
        ds, epochs=epochs, steps_per_epoch=steps_per_epoch, verbose=0, callbacks=[accountant]
    )
    return model, history


def test_logs_epsilon_of_the_noisy_updates_each_epoch():
    accountant = PrivacyAccountant(delta=DELTA)
    model, history = _fit(accountant, physical=8)  # ~3 micro-batches per step
    steps = int(model.dp_steps.numpy())
    assert 3 <= steps < 15  # fewer updates than Keras batches
    expected = accounting.compute_epsilon(1.5, B / N, steps, DELTA)
    assert history.history["epsilon"][-1] == pytest.approx(expected)
    assert history.history["dp_steps"][-1] == steps
    assert np.all(np.diff(history.history["epsilon"]) > 0)


def test_stops_before_the_update_that_would_exceed_the_target():
    target = accounting.compute_epsilon(1.5, B / N, 7, DELTA) + 1e-6
    accountant = PrivacyAccountant(delta=DELTA, target_epsilon=target)
    model, _ = _fit(accountant, epochs=10)
    assert int(model.dp_steps.numpy()) == 7
    assert accountant.epsilon() <= target


def test_max_steps_stops_at_exactly_that_many_updates():
    model, _ = _fit(PrivacyAccountant(delta=DELTA, max_steps=4), physical=8, epochs=10)
    assert int(model.dp_steps.numpy()) == 4


def test_epsilon_does_not_depend_on_augmult():
    a = PrivacyAccountant(delta=DELTA, max_steps=3)
    k1, _ = _fit(a)
    b = PrivacyAccountant(delta=DELTA, max_steps=3)
    k4, _ = _fit(b, augmult=4)
    assert int(k1.dp_steps.numpy()) == int(k4.dp_steps.numpy()) == 3
    assert a.epsilon() == b.epsilon()


def test_target_with_zero_noise_is_refused():
    with pytest.raises(ValueError, match="`target_epsilon`"):
        _fit(PrivacyAccountant(delta=DELTA, target_epsilon=8.0), sigma=0.0)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(delta=0.0), "delta"),
        (dict(delta=1.0), "delta"),
        (dict(delta=1e-5, target_epsilon=-1.0), "target_epsilon"),
        (dict(delta=1e-5, max_steps=0), "max_steps"),
        (dict(delta=1e-5, accountant="gdp"), "accountant"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        PrivacyAccountant(**kwargs)


def test_needs_a_dp_model():
    plain = dense_model()
    plain.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="DPKerasModel"):
        plain.fit(
            np.zeros((4, 4)), np.zeros((4, 3)), verbose=0, callbacks=[PrivacyAccountant(1e-5)]
        )


def _fit_with_steps_per_execution(max_steps=3):
    """Keras calls callbacks only every 4 batches here."""
    model = dp_model(
        dense_model(), l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=B, dataset_size=N
    )
    model.compile(optimizer="sgd", loss=model.loss, steps_per_execution=4)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(N, 4)).astype(np.float32), rng.integers(0, 3, N)
    ds = sampling.make_poisson_dataset(x, y, sampling.PoissonSampler(N, B))
    accountant = PrivacyAccountant(DELTA, max_steps=max_steps)
    model.fit(ds, epochs=2, steps_per_epoch=8, verbose=0, callbacks=[accountant])
    return int(model.dp_steps.numpy())


def test_step_cap_holds_inside_the_graph_with_steps_per_execution():
    assert _fit_with_steps_per_execution(max_steps=3) == 3


def test_power_check_callback_alone_overshoots_with_steps_per_execution(monkeypatch):
    """Without the in-graph cap, the same run applies more than 3 updates."""
    from tan_keras.keras_dp.dp_model import DPKerasModel

    monkeypatch.setattr(DPKerasModel, "set_step_limit", lambda self, steps: None)
    assert _fit_with_steps_per_execution(max_steps=3) > 3
