"""Tests of per-example clipping: the sensitivity bound and its edge cases."""

import numpy as np
import pytest
import tensorflow as tf

from tan_keras.mechanism import clipping


def _grads(rows):
    """Two 'variables' per example: a [2] vector and a [1, 2] matrix."""
    rows = np.asarray(rows, np.float32)
    return [tf.constant(rows[:, :2]), tf.constant(rows[:, 2:].reshape(-1, 1, 2))]


def test_norms_are_global_over_variables():
    grads = _grads([[3.0, 0.0, 0.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(clipping.per_example_global_norms(grads).numpy(), [5.0, 0.0])


def test_clip_scales_each_example_to_at_most_c():
    # Norms 5 (clipped to 1: scale 1/5) and 0.5 (kept).
    grads = _grads([[3.0, 0.0, 0.0, 4.0], [0.3, 0.0, 0.4, 0.0]])
    out = clipping.clip_and_sum(grads, 1.0, tf.ones([2]))
    total = np.concatenate([g.numpy().ravel() for g in out.grad_sum])
    np.testing.assert_allclose(total, [0.6 + 0.3, 0.0, 0.4, 0.8], rtol=1e-6)
    assert out.num_clipped.numpy() == 1
    assert out.num_examples.numpy() == 2
    np.testing.assert_allclose(out.norms.numpy(), [5.0, 0.5], rtol=1e-6)


def _moved_by_huge_example(clip_and_sum, huge, c=0.7):
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(6, 4)).astype(np.float32)
    without = clip_and_sum(_grads(rows), c, tf.ones([6]))
    with_huge = clip_and_sum(
        _grads(np.vstack([rows, [[huge, -huge, huge, huge]]])), c, tf.ones([7])
    )
    return np.linalg.norm(
        np.concatenate(
            [(a - b).numpy().ravel() for a, b in zip(with_huge.grad_sum, without.grad_sum)]
        )
    )


@pytest.mark.parametrize("huge", [1e3, 1e8, 3.4e37])
def test_one_huge_example_moves_the_sum_by_at_most_c(huge):
    moved = _moved_by_huge_example(clipping.clip_and_sum, huge)
    assert moved <= 0.7 * (1 + 1e-5)
    assert moved >= 0.7 * (1 - 1e-5)  # the bound is attained: the example is used


def test_power_check_sensitivity_test_rejects_unclipped_sum():
    """Summing without clipping (the bug) fails the bound used above."""

    def unclipped(grads, c, mask):
        return clipping.clip_and_sum(grads, 1e30, mask)

    assert _moved_by_huge_example(unclipped, 1e3) > 0.7 * (1 + 1e-5)


def test_zero_gradient_is_kept_without_nan():
    out = clipping.clip_and_sum(_grads(np.zeros((3, 4))), 1.0, tf.ones([3]))
    for g in out.grad_sum:
        assert np.all(np.isfinite(g.numpy()))
        assert np.all(g.numpy() == 0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_example_is_zeroed_and_counted(bad):
    rows = np.array([[0.1, 0.2, 0.0, 0.0], [bad, 1.0, 0.0, 0.0], [0.0, 0.0, 0.3, 0.0]])
    out = clipping.clip_and_sum(_grads(rows), 1.0, tf.ones([3]))
    total = np.concatenate([g.numpy().ravel() for g in out.grad_sum])
    np.testing.assert_allclose(total, [0.1, 0.2, 0.3, 0.0], rtol=1e-6)
    assert out.num_nonfinite.numpy() == 1
    assert out.num_examples.numpy() == 3


def test_padded_rows_contribute_exactly_nothing_even_if_nan():
    rows = np.array([[0.1, 0.2, 0.0, 0.0], [np.nan, 5.0, 1.0, 1.0], [9.0, 9.0, 9.0, 9.0]])
    out = clipping.clip_and_sum(_grads(rows), 1.0, tf.constant([1.0, 0.0, 0.0]))
    total = np.concatenate([g.numpy().ravel() for g in out.grad_sum])
    np.testing.assert_array_equal(total, np.array([0.1, 0.2, 0.0, 0.0], np.float32))
    assert out.num_examples.numpy() == 1
    assert out.num_nonfinite.numpy() == 0  # padding is not counted
    assert out.num_clipped.numpy() == 0
