"""`make_private_with_epsilon`: the noise calibrated for a budget, the plan shown, the budget kept.

Power check: the same training without the accountant the budget adds
spends more than the budget.
"""

import keras
import numpy as np
import pytest

import tan_keras
from tan_keras.keras_dp.callbacks import PrivacyAccountant
from tan_keras.privacy import accounting

N, B, EPS, DELTA = 64, 8, 4.0, 1e-3


def _base():
    inputs = keras.Input((4,))
    return keras.Model(inputs, keras.layers.Dense(3)(inputs))


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(N, 4)).astype(np.float32), rng.integers(0, 3, N)


def _make(**kwargs):
    model = tan_keras.make_private_with_epsilon(
        _base(),
        target_epsilon=EPS,
        delta=DELTA,
        epochs=2,
        expected_batch_size=B,
        dataset_size=N,
        **kwargs,
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _epsilon(model):
    accountant = PrivacyAccountant(DELTA)
    accountant.set_model(model)
    return accountant.epsilon()


def test_the_noise_is_calibrated_and_the_plan_printed(capsys):
    model = _make()
    printed = capsys.readouterr().out
    sigma = model.dp_config.noise_multiplier
    steps = 16  # ceil(2 * 64 / 8)
    spent = accounting.compute_epsilon(sigma, B / N, steps, DELTA)
    assert EPS - 0.05 <= spent <= EPS
    assert "calibrated noise_multiplier" in printed and "eps_TAN" in printed
    assert model.privacy_budget.plan["steps"] == steps


def test_training_longer_than_planned_stops_at_the_budget():
    model = _make(verbose=False)
    x, y = _data()
    model.fit(x, y, batch_size=B, epochs=6, verbose=0)
    assert _epsilon(model) <= EPS
    assert 14 <= int(model.dp_steps.numpy()) < 40


def test_power_check_without_the_budget_the_same_training_overspends():
    model = _make(verbose=False)
    model.privacy_budget = None
    x, y = _data()
    model.fit(x, y, batch_size=B, epochs=6, verbose=0)
    assert _epsilon(model) > EPS


@pytest.mark.parametrize(
    "overrides, name",
    [
        (dict(noise_multiplier=1.0), "noise_multiplier"),
        (dict(target_epsilon=-1.0), "target_epsilon"),
        (dict(delta=1.5), "delta"),
        (dict(epochs=0), "epochs"),
        (dict(accountant="moments"), "accountant"),
    ],
)
def test_bad_arguments_are_refused_by_name(overrides, name):
    arguments = dict(
        target_epsilon=EPS, delta=DELTA, epochs=2, expected_batch_size=B, dataset_size=N
    )
    with pytest.raises(ValueError, match=f"`{name}`"):
        tan_keras.make_private_with_epsilon(_base(), **{**arguments, **overrides})
