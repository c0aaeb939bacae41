"""TAN: eta, eps_TAN and the privacy wall of docs/tan-method.md, section 3."""

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tan_keras.privacy import accounting, overcharge, tan

CIFAR = (3.0, 4096 / 50000, 2500)
IMAGENET_18K = (2.5, 32768 / 1281167, 18000)
IMAGENET_72K = (2.5, 16384 / 1281167, 72000)


@pytest.mark.parametrize(
    "run, delta, eta, eps_tan",
    [
        (CIFAR, 1e-5, 0.965, 7.48),
        (IMAGENET_18K, 8e-7, 0.971, 8.22),
        (IMAGENET_72K, 8e-7, 0.971, 8.22),
    ],
    ids=["cifar10", "imagenet-18k", "imagenet-72k"],
)
def test_paper_eta_and_eps_tan(run, delta, eta, eps_tan):
    value = tan.eta(*run)
    assert value == pytest.approx(eta, abs=5e-4)
    assert tan.eps_tan(value, delta) == pytest.approx(eps_tan, abs=5e-3)


def test_eta_is_sqrt_steps_times_eta_step():
    sigma, q, steps = CIFAR
    assert tan.eta_step(sigma, q) == pytest.approx(q / (math.sqrt(2) * sigma))
    assert tan.eta(*CIFAR) ** 2 == pytest.approx(steps * tan.eta_step(sigma, q) ** 2)


def test_eta_depends_on_sigma_over_batch_size_only():
    # Fixed N and S: (4096, 3) and (256, 0.1875) have the same eta.
    assert tan.eta(0.1875, 256 / 50000, 2500) == pytest.approx(tan.eta(*CIFAR), rel=1e-12)


def test_eta_edge_cases():
    assert tan.eta(3.0, 0.1, 0) == 0.0
    assert tan.eta(0.0, 0.1, 10) == math.inf
    assert tan.eta_step(0.0, 0.1) == math.inf
    assert tan.eps_tan(math.inf, 1e-5) == math.inf
    assert tan.eps_tan(0.0, 1e-5) == 0.0
    assert tan.eta_for_epsilon(0.0, 1e-5) == 0.0


@given(eta=st.floats(0.0, 50.0), delta=st.floats(1e-12, 0.5))
@settings(max_examples=200, deadline=None, derandomize=True)
def test_eta_for_epsilon_inverts_eps_tan(eta, delta):
    assert tan.eta_for_epsilon(tan.eps_tan(eta, delta), delta) == pytest.approx(
        eta, rel=1e-9, abs=1e-9
    )


# The privacy wall (S = 10,000, delta = 8e-7): at a fixed eta the exact
# epsilon tends to eps_TAN as sigma grows and explodes below sigma ~ 2.
WALL = [
    (0.95, 0.5, 34.4),
    (0.95, 1.0, 10.5),
    (0.95, 2.0, 8.04),
    (0.95, 3.0, 7.68),
    (0.95, 5.0, 7.50),
    (0.13, 0.5, 7.3),
    (0.13, 1.0, 1.40),
    (0.13, 2.0, 0.90),
    (0.13, 5.0, 0.84),
]


@pytest.mark.parametrize("eta, sigma, expected", WALL)
def test_privacy_wall(eta, sigma, expected):
    steps = 10_000
    q = eta * math.sqrt(2) * sigma / math.sqrt(steps)
    assert tan.eta(sigma, q, steps) == pytest.approx(eta, rel=1e-12)
    eps = accounting.compute_epsilon(sigma, q, steps, 8e-7)
    assert eps == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("eta", [0.95, 0.13])
def test_eps_tan_is_accurate_only_above_the_wall(eta):
    steps, delta = 10_000, 8e-7
    estimate = tan.eps_tan(eta, delta)

    def ratio(sigma):
        q = eta * math.sqrt(2) * sigma / math.sqrt(steps)
        return accounting.compute_epsilon(sigma, q, steps, delta) / estimate

    # Above the wall eps_TAN is close and slightly pessimistic (0.84 vs 0.99
    # at eta = 0.13, sigma = 5); below it, far too optimistic.
    assert 0.8 < ratio(2.0) < 1.05
    assert 0.8 < ratio(5.0) < 1.05
    assert ratio(0.5) > 4.0  # 34.4 vs 8.0, 7.3 vs 0.99


def test_reference_run_is_not_overcharged():
    report = overcharge.check_overcharge(*CIFAR, delta=1e-5)
    assert not report.overcharged
    assert report.epsilon == pytest.approx(7.10, abs=0.02)
    assert report.eps_tan == pytest.approx(7.48, abs=0.01)
    assert report.ratio == pytest.approx(report.epsilon / report.eps_tan)
    assert report.message.startswith("Not overcharged")
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.overcharged = True


def test_simulation_is_overcharged_and_the_message_says_what_that_means():
    report = overcharge.check_overcharge(3 / 8, 512 / 50000, 2500, 1e-5)
    assert report.overcharged
    assert report.eta == pytest.approx(0.965, abs=5e-4)
    assert report.epsilon == pytest.approx(63.0, abs=0.5)
    assert report.ratio > 8
    message = report.message
    assert "spent faster than the TAN estimate predicts" in message
    assert "sigma/B" in message
    assert "no meaningful epsilon" in message  # sigma = 0.375 < 0.5


def test_mildly_overcharged_run_is_not_called_meaningless():
    report = overcharge.check_overcharge(1.0, 0.0134, 10_000, 8e-7)
    assert report.overcharged
    assert "no meaningful epsilon" not in report.message


def test_overcharge_boundary_is_sigma_two():
    q, steps = 0.02, 1000
    assert tan.OVERCHARGE_SIGMA == 2.0
    assert not overcharge.check_overcharge(2.0, q, steps, 1e-5).overcharged
    assert overcharge.check_overcharge(1.999, q, steps, 1e-5).overcharged


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: tan.eta(-1.0, 0.1, 10), "noise_multiplier"),
        (lambda: tan.eta(1.0, 0.0, 10), "sampling_rate"),
        (lambda: tan.eta(1.0, 0.1, 2.5), "steps"),
        (lambda: tan.eps_tan(-0.1, 1e-5), "eta"),
        (lambda: tan.eps_tan(0.5, 1.0), "delta"),
        (lambda: tan.eta_for_epsilon(-1.0, 1e-5), "epsilon"),
        (lambda: tan.eta_for_epsilon(1.0, 0.0), "delta"),
        (lambda: overcharge.check_overcharge(0.0, 0.1, 10, 1e-5), "noise_multiplier"),
        (lambda: overcharge.check_overcharge(1.0, 0.1, 0, 1e-5), "steps"),
        (lambda: overcharge.check_overcharge(1.0, 0.1, 10, 1e-5, "x"), "accountant"),
    ],
)
def test_rejects_bad_arguments(call, name):
    with pytest.raises(ValueError, match=f"Invalid value for `{name}`: expected"):
        call()
