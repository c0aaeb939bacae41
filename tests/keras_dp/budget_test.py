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


def _adapted_base(noise_multiplier):
    """A model whose Normalization was adapted privately: a release already in its ledger."""
    inputs = keras.Input((4,))
    normalizer = keras.layers.Normalization()
    x, _ = _data()
    tan_keras.private_adapt(normalizer, x, lower=-4, upper=4, noise_multiplier=noise_multiplier)
    return keras.Model(inputs, keras.layers.Dense(3)(normalizer(inputs)))


def _planned_epsilon(model, delta=DELTA):
    steps = model.privacy_budget.plan["steps"]
    entries = model.privacy_ledger.entries()
    (training,) = [e.mechanism for e in entries if e.mechanism.kind == "poisson"]
    return model.privacy_ledger.epsilon(delta, steps={training: steps})


def test_releases_already_in_the_weights_are_counted_in_the_calibration(capsys):
    arguments = dict(
        target_epsilon=EPS, delta=DELTA, epochs=2, expected_batch_size=B, dataset_size=N
    )
    model = tan_keras.make_private_with_epsilon(_adapted_base(3.0), **arguments)
    alone = tan_keras.make_private_with_epsilon(_base(), **arguments, verbose=False)
    assert "already went through 1 private release" in capsys.readouterr().out
    # The planned training composed with the adapt's release fits the budget.
    assert EPS - 0.05 <= _planned_epsilon(model) <= EPS
    assert model.dp_config.noise_multiplier > alone.dp_config.noise_multiplier


def test_power_check_calibrating_for_the_training_alone_overspends(monkeypatch):
    from tan_keras.keras_dp import budget

    monkeypatch.setattr(budget, "_earlier_releases", lambda model: [])
    arguments = dict(
        target_epsilon=EPS, delta=DELTA, epochs=2, expected_batch_size=B, dataset_size=N
    )
    model = tan_keras.make_private_with_epsilon(_adapted_base(3.0), **arguments, verbose=False)
    assert _planned_epsilon(model) > EPS + 0.1


def test_a_budget_the_earlier_releases_already_spent_is_refused():
    with pytest.raises(ValueError, match="`target_epsilon`.*already spent"):
        tan_keras.make_private_with_epsilon(
            _adapted_base(0.3),
            target_epsilon=1.0,
            delta=DELTA,
            epochs=2,
            expected_batch_size=B,
            dataset_size=N,
        )
