"""Poisson steps drawn from arrays on the JAX backend (numpy only)."""

import math

import numpy as np
import pytest

from tan_keras.jax_dp import example_source, poisson_steps


def _z_of_inclusions(q_sampled, q_claimed, rows=200, steps=400):
    x = np.arange(rows, dtype="float32")[:, None]
    expected_batch = max(1, round(q_sampled * rows))
    draws = poisson_steps.poisson_steps(
        example_source.array_rows(x, x[:, 0]), len(x), q_sampled, expected_batch, row_multiple=8
    )
    total = sum(int(next(draws)[2]["keep"].sum()) for _ in range(steps))
    n = rows * steps
    return (total - n * q_claimed) / math.sqrt(n * q_claimed * (1 - q_claimed))


def test_each_row_is_drawn_with_probability_q():
    assert abs(_z_of_inclusions(0.1, 0.1)) < 4
    # Power check: a sampler drawing at 0.11 when 0.1 is claimed is caught.
    assert abs(_z_of_inclusions(0.11, 0.1)) > 4


def test_a_step_holds_each_drawn_row_once_then_zero_padding():
    x = np.arange(1, 101, dtype="float32")[:, None] * np.ones((1, 3), "float32")
    y = np.arange(1, 101).astype("int32")
    draws = poisson_steps.poisson_steps(
        example_source.array_rows({"a": x}, y), len(x), 0.2, 20, row_multiple=8
    )
    for _ in range(20):
        step_x, step_y, step = next(draws)
        keep = step["keep"]
        drawn = int(keep.sum())
        assert len(keep) % 8 == 0 and len(keep) >= poisson_steps.padded_rows(20, 0.2, 8)
        assert keep[:drawn].all() and not keep[drawn:].any()
        assert len(set(step_y[:drawn])) == drawn
        np.testing.assert_array_equal(step_x["a"][:drawn, 0], step_y[:drawn])
        assert not step_x["a"][drawn:].any() and not step_y[drawn:].any()
        assert (step["noise_key"] == step["noise_key"][0]).all()


@pytest.mark.parametrize("rows, multiple", [(10, 4), (33, 8)])
def test_a_step_larger_than_the_usual_padding_gets_more_rows(rows, multiple):
    # q = 1: every row is drawn, more than B + 4 std when the std is 0.
    x = np.ones((rows, 2), "float32")
    _, _, step = next(
        poisson_steps.poisson_steps(
            example_source.array_rows(x, x[:, 0]), len(x), 1.0, rows, row_multiple=multiple
        )
    )
    assert step["keep"].sum() == rows
    assert len(step["keep"]) == math.ceil(rows / multiple) * multiple


def _steps(secret, process=(0, 1), count=12, row_multiple=12):
    x = np.arange(1, 201, dtype="float32")[:, None]
    draws = poisson_steps.poisson_steps(
        example_source.array_rows(x, x[:, 0].astype("int32")),
        len(x),
        0.1,
        20,
        row_multiple=row_multiple,
        secret=secret,
        process=process,
    )
    return [next(draws) for _ in range(count)]


def test_processes_sharing_a_secret_split_each_step_between_them():
    whole = _steps(secret=12345)
    shares = [_steps(secret=12345, process=(p, 3), count=12) for p in range(3)]
    other = _steps(secret=12346)
    keys = set()
    for step, *parts in zip(whole, *shares):
        _, y, info = step
        drawn = sorted(y[info["keep"]])
        mine = [part[1][part[2]["keep"]] for part in parts]
        assert sorted(np.concatenate(mine)) == drawn
        assert all(len(part[2]["keep"]) * 3 == len(info["keep"]) for part in parts)
        assert max(map(len, mine)) - min(map(len, mine)) <= 1  # an even split
        for part in parts:
            np.testing.assert_array_equal(
                part[2]["noise_key"], info["noise_key"][: len(part[2]["keep"])]
            )
            assert not part[1][~part[2]["keep"]].any()
        keys.add(tuple(info["noise_key"][0]))
    assert len(keys) == len(whole)
    # Power check: another secret draws other examples and other keys.
    assert any(
        sorted(a[1][a[2]["keep"]]) != sorted(b[1][b[2]["keep"]]) for a, b in zip(whole, other)
    )
    assert not keys & {tuple(step[2]["noise_key"][0]) for step in other}


def test_several_processes_need_a_shared_secret_and_an_even_split():
    with pytest.raises(ValueError, match="shared secret"):
        _steps(secret=None, process=(0, 2), count=1)
    with pytest.raises(ValueError, match="P dividing row_multiple"):
        _steps(secret=1, process=(0, 3), count=1, row_multiple=8)
