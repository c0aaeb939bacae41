"""Simulation plans and step search: the TAN scaling recipes of the paper."""

import dataclasses
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tan_keras.privacy import planning


def _cifar_plan(**overrides):
    args = dict(
        ref_batch_size=4096,
        ref_noise_multiplier=3.0,
        steps=2500,
        dataset_size=50000,
        delta=1e-5,
        batch_size=256,
    )
    return planning.plan_simulation(**{**args, **overrides})


def test_cifar_simulation_plan():
    plan = _cifar_plan(augmult=16)
    sim, ref = plan.simulation, plan.reference
    assert sim.noise_multiplier == 0.1875  # 3 * 256 / 4096
    assert sim.batch_size == 256 and sim.steps == ref.steps == 2500
    assert sim.eta == pytest.approx(ref.eta, rel=1e-12)
    assert sim.eps_tan == pytest.approx(ref.eps_tan, rel=1e-12)
    assert ref.epsilon == pytest.approx(7.10, abs=0.02)
    assert sim.epsilon > 100  # same eta, but overcharged
    assert ref.private and not ref.overcharged
    assert not sim.private and sim.overcharged
    assert plan.compute_saving == 16
    assert ref.gradient_evaluations == 2500 * 4096 * 16
    assert sim.gradient_evaluations == 2500 * 256 * 16


def test_imagenet_simulation_plan():
    plan = planning.plan_simulation(32768, 2.5, 18000, 1281167, 8e-7, batch_size=256)
    assert plan.compute_saving == 128
    assert plan.simulation.noise_multiplier == pytest.approx(2.5 / 128)
    assert plan.reference.epsilon == pytest.approx(7.98, abs=0.03)
    assert plan.simulation.epsilon > 1e6  # "astronomically large"
    assert plan.simulation.eta == pytest.approx(0.971, abs=5e-4)


def test_a_simulation_at_full_batch_size_is_still_not_private():
    # Simulation runs are tuning runs; only the reference's epsilon is claimed.
    plan = _cifar_plan(batch_size=4096)
    assert plan.simulation.epsilon == plan.reference.epsilon
    assert plan.reference.private and not plan.simulation.private
    assert plan.compute_saving == 1


def test_an_overcharged_reference_is_not_private():
    plan = _cifar_plan(ref_noise_multiplier=1.5)
    assert plan.reference.overcharged and not plan.reference.private


def test_plan_to_dict_is_strict_json():
    plan = _cifar_plan()
    data = json.loads(json.dumps(plan.to_dict(), allow_nan=False))
    assert data["compute_saving"] == 16
    for run in ("simulation", "reference"):
        assert set(data[run]) == {f.name for f in dataclasses.fields(planning.RunPrivacy)}
    assert data["simulation"]["private"] is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.delta = 1e-6


def test_non_finite_epsilon_becomes_null():
    run = dataclasses.replace(_cifar_plan().simulation, epsilon=math.inf)
    assert run.to_dict()["epsilon"] is None
    json.dumps(run.to_dict(), allow_nan=False)


@pytest.mark.parametrize(
    "overrides, name",
    [
        (dict(batch_size=8192), "batch_size"),
        (dict(batch_size=0), "batch_size"),
        (dict(ref_batch_size=60000), "ref_batch_size"),
        (dict(ref_noise_multiplier=0.0), "ref_noise_multiplier"),
        (dict(steps=0), "steps"),
        (dict(dataset_size=-5), "dataset_size"),
        (dict(delta=1.0), "delta"),
        (dict(augmult=0), "augmult"),
        (dict(accountant="renyi"), "accountant"),
    ],
)
def test_plan_rejects(overrides, name):
    with pytest.raises(ValueError, match=f"Invalid value for `{name}`: expected"):
        _cifar_plan(**overrides)


@given(
    ref_batch=st.integers(2, 50000),
    fraction=st.floats(0.001, 1.0),
    ref_sigma=st.floats(0.5, 20.0),
    steps=st.integers(1, 10000),
)
@settings(max_examples=15, deadline=None, derandomize=True)
def test_plans_keep_steps_and_sigma_over_batch(ref_batch, fraction, ref_sigma, steps):
    batch = max(1, int(ref_batch * fraction))
    plan = planning.plan_simulation(ref_batch, ref_sigma, steps, 50000, 1e-5, batch)
    sim, ref = plan.simulation, plan.reference
    assert sim.noise_multiplier / sim.batch_size == pytest.approx(
        ref.noise_multiplier / ref.batch_size, rel=1e-12
    )
    assert sim.eta == pytest.approx(ref.eta, rel=1e-12)
    # A smaller batch at the same eta never has a smaller epsilon.
    assert sim.epsilon >= ref.epsilon * (1 - 1e-9)


def test_imagenet_step_search():
    points = planning.step_search(
        noise_multiplier=2.5,
        ref_batch_size=32768,
        ref_steps=18000,
        ref_learning_rate=32.0,
        dataset_size=1281167,
        delta=8e-7,
        steps_grid=[18000, 72000],
    )
    assert [p.batch_size for p in points] == [32768, 16384]
    assert [p.learning_rate for p in points] == [32.0, 8.0]
    assert points[0].eta == pytest.approx(points[1].eta, rel=1e-12)
    assert points[0].epsilon == pytest.approx(7.98, abs=0.03)
    assert points[1].epsilon == pytest.approx(7.95, abs=0.03)
    assert not any(p.overcharged for p in points)
    json.dumps([p.to_dict() for p in points], allow_nan=False)


@pytest.mark.parametrize(
    "steps_grid, match",
    [
        ([], "`steps_grid`: expected a non-empty list"),
        (5, "`steps_grid`: expected a non-empty list"),
        ([18000, 0], "`steps_grid`: expected an integer >= 1"),
        ([18000, 1.5], "`steps_grid`: expected an integer >= 1"),
        # S = 1 needs B = 32768 * sqrt(18000) = 4.4M > N.
        ([1], "`steps_grid`: expected step counts whose batch size"),
    ],
)
def test_step_search_rejects(steps_grid, match):
    with pytest.raises(ValueError, match=match):
        planning.step_search(2.5, 32768, 18000, 32.0, 1281167, 8e-7, steps_grid)
