"""The private mean and variance: sensitivity of one example, noise std, entropy.

The statistical test releases the same sums many times with a fixed seed
and checks the errors of the released mean against N(0, std^2), std =
(upper - lower) sigma sqrt(2d) / N, with a chi-square interval on their
variance and a z-bound on their mean (a correct implementation fails with
probability 1e-6). Power check: the same test rejects a release whose noise
is sqrt(2) too small (sensitivity sqrt(d) instead of sqrt(2d)) or added to
the mean instead of the sum.
"""

import math
import warnings

import numpy as np
import pytest
from _helpers import released_fraction_ok

from tan_keras.mechanism import moments
from tan_keras.mechanism.noise import NotPrivateWarning

LOWER, UPPER = np.array([-2.0, 0.0, 10.0]), np.array([2.0, 1.0, 30.0])


def test_one_example_contributes_at_most_one_per_coordinate_whatever_its_values():
    # Huge, infinite and NaN values: each coordinate of an example's
    # contribution stays in [0, 1], so the pair of sums moves by at most
    # sqrt(2d) when it is added or removed.
    x = np.array([[[1e300, -np.inf, np.nan], [np.inf, 5.0, -1e300]]])  # [1, 2 positions, 3]
    one = moments.clipped_moments(x, LOWER, UPPER, example_axes=(1,))
    contribution = np.concatenate([one.sum_u, one.sum_u2])
    assert one.count == 1
    assert np.all((contribution >= 0) & (contribution <= 1))
    assert np.linalg.norm(contribution) <= math.sqrt(2 * 3)
    # Clipped then rescaled: u = 1 (clipped up), 0 (clipped down, or NaN).
    np.testing.assert_allclose(one.sum_u, [1.0, 0.5, 0.0])


def test_the_moments_of_examples_with_several_positions_are_their_own_means():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, size=(5, 4, 3))
    got = moments.clipped_moments(x, 0.0, 1.0, example_axes=(1,))
    np.testing.assert_allclose(got.sum_u, x.mean(axis=1).sum(axis=0))
    np.testing.assert_allclose(got.sum_u2, (x**2).mean(axis=1).sum(axis=0))
    both = moments.clipped_moments(x[:2], 0.0, 1.0, (1,)) + moments.clipped_moments(
        x[2:], 0.0, 1.0, (1,)
    )
    np.testing.assert_allclose(both.sum_u, got.sum_u)
    assert both.count == 5


def test_without_noise_the_release_maps_back_to_the_exact_statistics():
    rng = np.random.default_rng(1)
    x = rng.uniform(LOWER, UPPER, size=(1000, 3))
    sums = moments.clipped_moments(x, LOWER, UPPER, ())

    class Silent:
        def normal(self, loc, scale, size):
            return np.zeros(size)

    stats = moments.release(sums, LOWER, UPPER, 1.0, Silent())
    np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.variance, x.var(0), rtol=1e-9)
    np.testing.assert_allclose(stats.mean_noise_std, (UPPER - LOWER) * math.sqrt(6) / 1000)


def _released_means(sigma, trials=3000):
    """Means released from 400 equal examples, `trials` times, with a fixed seed."""
    x = np.tile(np.array([[1.0, 0.25, 20.0]]), (400, 1))
    sums = moments.clipped_moments(x, LOWER, UPPER, ())
    rng = np.random.default_rng(1234)
    means = [moments.release(sums, LOWER, UPPER, sigma, rng).mean for _ in range(trials)]
    return np.stack(means), x[0]


def test_the_noise_std_of_the_released_mean_is_the_stated_one():
    sigma = 0.8
    released, truth = _released_means(sigma)
    std = (UPPER - LOWER) * sigma * math.sqrt(2 * 3) / 400
    for feature in range(3):
        assert released_fraction_ok(released[:, feature], truth[feature], std[feature])
    stats = moments.release(
        moments.clipped_moments(np.zeros((400, 3)), LOWER, UPPER, ()),
        LOWER,
        UPPER,
        sigma,
        np.random.default_rng(0),
    )
    np.testing.assert_allclose(stats.mean_noise_std, std)


@pytest.mark.parametrize("slip", ["sensitivity sqrt(d)", "noise on the mean"])
def test_power_check_a_wrong_noise_scale_is_rejected(slip):
    sigma = 0.8
    std = (UPPER - LOWER) * sigma * math.sqrt(2 * 3) / 400
    # Each slip is the right code run with a wrong noise scale: sqrt(d)
    # instead of sqrt(2d), or the sum's noise std put on the mean (x N).
    wrong = sigma / math.sqrt(2) if slip == "sensitivity sqrt(d)" else sigma * 400
    released, truth = _released_means(wrong)
    assert not all(released_fraction_ok(released[:, f], truth[f], std[f]) for f in range(3))


def test_the_noise_comes_from_os_entropy_unless_seeded():
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotPrivateWarning)
        first = moments.noise_generator().normal(size=4)
        second = moments.noise_generator().normal(size=4)
    assert not np.allclose(first, second)
    with pytest.warns(NotPrivateWarning, match="NOT private"):
        seeded = moments.noise_generator(3).normal(size=4)
    with pytest.warns(NotPrivateWarning):
        np.testing.assert_array_equal(seeded, moments.noise_generator(3).normal(size=4))


def test_the_release_refuses_a_zero_noise_multiplier_or_no_example():
    sums = moments.clipped_moments(np.zeros((3, 3)), LOWER, UPPER, ())
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="`noise_multiplier`: expected a finite float > 0"):
        moments.release(sums, LOWER, UPPER, 0.0, rng)
    empty = moments.ClippedMoments(np.zeros(3), np.zeros(3), 0)
    with pytest.raises(ValueError, match="`data`.*at least one example"):
        moments.release(empty, LOWER, UPPER, 1.0, rng)
