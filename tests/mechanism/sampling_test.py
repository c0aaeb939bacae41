"""Poisson sampler: the sampling the accountant assumes, with static shapes."""

import math
import warnings

import numpy as np
import pytest
import tensorflow as tf
from _helpers import dense_model, dp_model, flat, one_step

from tan_keras.mechanism import sampling
from tan_keras.mechanism.noise import NotPrivateWarning

N, B = 400, 20  # q = 0.05


def _logical_batches(sampler, steps):
    """Reassembles logical batches (index lists) from the micro-batch stream."""
    batches, current = [], []
    for idx, mask, end, identity in sampler.micro_batches(steps):
        assert idx.shape == (sampler.physical_batch_size,)
        assert identity.shape == (sampler.physical_batch_size, len(sampling.IDENTITY_COLUMNS))
        current.extend(idx.numpy()[mask.numpy() > 0].tolist())
        assert end.shape == (sampler.physical_batch_size,)
        assert end.numpy().all() or not end.numpy().any()
        if end.numpy()[0]:
            batches.append(current)
            current = []
    assert current == []
    return batches


def _sizes_match_binomial(sizes, n, q):
    """Mean and variance of batch sizes within 4 standard errors of Binomial(n, q)."""
    sizes = np.asarray(sizes, float)
    k = len(sizes)
    mean, var = n * q, n * q * (1 - q)
    mean_se = math.sqrt(var / k)
    # Var of the sample variance ~ (mu4 - var^2 (k-3)/(k-1)) / k; for a binomial
    # with n q large this is close to 2 var^2 / (k - 1).
    var_se = math.sqrt(2 * var**2 / (k - 1))
    return abs(sizes.mean() - mean) < 4 * mean_se and abs(sizes.var(ddof=1) - var) < 4 * var_se


def _never_sampled_fraction(batches, n):
    seen = np.zeros(n, bool)
    for batch in batches:
        seen[batch] = True
    return 1 - seen.mean()


@pytest.fixture(scope="module")
def poisson_batches():
    sampler = sampling.PoissonSampler(N, B, physical_batch_size=16)  # forces spills
    return _logical_batches(sampler, 400)


def test_batch_sizes_are_binomial(poisson_batches):
    assert _sizes_match_binomial([len(b) for b in poisson_batches], N, B / N)


def test_power_check_fixed_size_batches_fail_the_binomial_test():
    rng = np.random.default_rng(0)
    fixed = [rng.choice(N, B, replace=False) for _ in range(400)]
    assert not _sizes_match_binomial([len(b) for b in fixed], N, B / N)


def test_about_e_minus_1_never_sampled_after_one_over_q_steps(poisson_batches):
    # After 1/q = 20 steps an example is missed with prob (1-q)^20 = 0.358;
    # over 400 examples the fraction's std is 0.024: 4 std = 0.096.
    steps = N // B
    for start in range(0, 400, steps):
        fraction = _never_sampled_fraction(poisson_batches[start : start + steps], N)
        assert abs(fraction - (1 - B / N) ** steps) < 0.096


def test_power_check_shuffling_sampler_fails_the_never_sampled_test():
    perm = np.random.default_rng(0).permutation(N)
    shuffled = [perm[i : i + B] for i in range(0, N, B)]
    assert abs(_never_sampled_fraction(shuffled, N) - (1 - B / N) ** (N // B)) > 0.096


def test_large_samples_spill_into_more_micro_batches_never_truncated(poisson_batches):
    assert max(len(b) for b in poisson_batches) > 16  # some steps needed 2+ micro-batches
    for batch in poisson_batches:
        assert len(set(batch)) == len(batch)
        assert all(0 <= i < N for i in batch)


def _micro_batches_per_step(sampler, steps):
    counts, current = [], 0
    for _, _, end, _ in sampler.micro_batches(steps):
        current += 1
        if end.numpy()[0]:
            counts.append(current)
            current = 0
    return counts


def test_padded_steps_take_the_same_micro_batches_whatever_their_size():
    # B + 4 std = 20 + ceil(4 sqrt(19)) = 38 rows: 3 micro-batches of 16.
    sampler = sampling.PoissonSampler(N, B, physical_batch_size=16, pad_steps=True)
    assert sampler.steps_padded_to == 3
    assert set(_micro_batches_per_step(sampler, 200)) == {3}
    # Padded by default; unpadded is refused where it would count n.
    assert sampling.PoissonSampler(N, B, physical_batch_size=16).steps_padded_to == 3
    with pytest.raises(ValueError, match="pad_steps.*realized batch size"):
        sampling.PoissonSampler(N, B, physical_batch_size=16, pad_steps=False)
    # Power check: unpadded (the attribute set by hand), the count follows n.
    unpadded = sampling.PoissonSampler(N, B, physical_batch_size=16)
    unpadded.pad_steps = False
    assert len(set(_micro_batches_per_step(unpadded, 200))) > 1
    assert unpadded.steps_padded_to is None
    # A step above B + 4 std still spills, whole: padding never truncates.
    sampler.sample_indices = lambda step: tf.range(60, dtype=tf.int64)
    batches = _logical_batches(sampler, 2)
    assert [len(b) for b in batches] == [60, 60]
    assert _micro_batches_per_step(sampler, 1) == [4]


def test_empty_steps_are_valid_steps():
    sampler = sampling.PoissonSampler(1000, 1, physical_batch_size=4)  # q = 0.001
    items = list(sampler.micro_batches(50))
    ends = [bool(e.numpy()[0]) for _, _, e, _ in items]
    assert sum(ends) == 50  # one step_end per logical step, empty or not
    assert any(m.numpy().sum() == 0 and e.numpy()[0] for _, m, e, _ in items)


def test_reiterating_never_replays_and_resume_reproduces():
    with pytest.warns(NotPrivateWarning):
        sampler = sampling.PoissonSampler(N, B, seed=3)
    first = _logical_batches(sampler, 5)
    second = _logical_batches(sampler, 5)
    assert first != second
    sampler.resume_at(3)
    assert _logical_batches(sampler, 2) == first[3:]


def test_unseeded_samplers_differ():
    a = _logical_batches(sampling.PoissonSampler(N, B), 3)
    b = _logical_batches(sampling.PoissonSampler(N, B), 3)
    assert a != b


def test_default_physical_batch_size_rarely_spills():
    p = sampling.default_physical_batch_size(4096, 50000)
    assert p == 4096 + math.ceil(4 * math.sqrt(4096 * (1 - 4096 / 50000)))
    assert sampling.default_physical_batch_size(10, 10) == 10


def test_padded_rows_change_nothing():
    """The same real rows, with or without padding, give the same update."""
    base = dense_model()
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 4)).astype(np.float32), rng.integers(0, 3, 6)
    kwargs = dict(l2_norm_clip=0.1, noise_multiplier=0.0, expected_batch_size=6, dataset_size=50)
    plain = one_step(dp_model(base, **kwargs), x, y)
    junk = rng.normal(size=(4, 4)).astype(np.float32) * 1e3
    padded = one_step(
        dp_model(base, **kwargs),
        np.vstack([x, junk]),
        np.r_[y, [0, 1, 2, 0]],
        np.r_[np.ones(6), np.zeros(4)],
    )
    np.testing.assert_allclose(flat(padded), flat(plain), atol=1e-7)


def test_make_poisson_dataset_shapes_and_views():
    x = np.arange(N * 2, dtype=np.float32).reshape(N, 2)
    y = np.arange(N, dtype=np.int32)
    sampler = sampling.PoissonSampler(N, B, physical_batch_size=32)
    ds = sampling.make_poisson_dataset(x, y, sampler, steps=3, augmult=3)
    for xb, yb, mask, _, identity in ds:
        assert xb.shape == (32, 3, 2) and yb.shape == (32,) and mask.shape == (32,)
        np.testing.assert_array_equal(identity.numpy()[:, 3:5], np.tile([[N, B]], (32, 1)))
        real = mask.numpy() > 0
        np.testing.assert_array_equal(xb.numpy()[real, 1, :], x[yb.numpy()[real]])


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(dataset_size=0, expected_batch_size=1), "dataset_size"),
        (dict(dataset_size=10, expected_batch_size=11), "expected_batch_size"),
        (dict(dataset_size=10, expected_batch_size=0), "expected_batch_size"),
        (
            dict(dataset_size=10, expected_batch_size=2, physical_batch_size=0),
            "physical_batch_size",
        ),
        (dict(dataset_size=10, expected_batch_size=2, seed=-1), "seed"),
        (dict(dataset_size=10, expected_batch_size=2, pad_steps=1), "pad_steps"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        sampling.PoissonSampler(**kwargs)


def test_dataset_size_must_match_the_data():
    sampler = sampling.PoissonSampler(10, 2)
    with pytest.raises(ValueError, match="`dataset_size`"):
        sampling.make_poisson_dataset(np.zeros((20, 2)), np.zeros(20), sampler)
    with pytest.raises(ValueError, match="`augmult`"):
        sampling.make_poisson_dataset(np.zeros((10, 2)), np.zeros(10), sampler, augmult=0)


def test_shards_together_hold_each_global_micro_batch_exactly_once():
    x = np.arange(N, dtype=np.float32)[:, None]
    y = np.arange(N, dtype=np.int32)
    key = sampling.PoissonSampler.new_secret_key()

    def rows(num_shards, shard_index):
        sampler = sampling.PoissonSampler(N, B, physical_batch_size=16, secret_key=key)
        ds = sampling.make_poisson_dataset(
            x, y, sampler, steps=6, num_shards=num_shards, shard_index=shard_index
        )
        return [(yb.numpy(), m.numpy(), e.numpy()) for _, yb, m, e, _ in ds]

    whole = rows(1, 0)
    parts = [rows(4, i) for i in range(4)]
    assert all(len(p) == len(whole) for p in parts)
    for j, (yb, mask, end) in enumerate(whole):
        np.testing.assert_array_equal(np.concatenate([p[j][0] for p in parts]), yb)
        np.testing.assert_array_equal(np.concatenate([p[j][1] for p in parts]), mask)
        np.testing.assert_array_equal(np.concatenate([p[j][2] for p in parts]), end)


def test_shard_arguments_are_checked():
    sampler = sampling.PoissonSampler(N, B, physical_batch_size=10)
    x, y = np.zeros((N, 1)), np.zeros(N)
    with pytest.raises(ValueError, match="`num_shards`"):
        sampling.make_poisson_dataset(x, y, sampler, num_shards=4)
    with pytest.raises(ValueError, match="`shard_index`"):
        sampling.make_poisson_dataset(x, y, sampler, num_shards=2, shard_index=2)
    with pytest.raises(ValueError, match="`secret_key`"):
        sampling.PoissonSampler(N, B, seed=1, secret_key=2)


def test_every_row_carries_its_micro_batch_identity():
    sampler = sampling.PoissonSampler(N, B, physical_batch_size=8, pad_steps=True)
    per_step = sampler.steps_padded_to
    items = [identity.numpy() for *_, identity in sampler.micro_batches(3)]
    assert len(items) == 3 * per_step
    source = items[0][0, 5]
    for index, identity in enumerate(items):
        step, micro = divmod(index, per_step)
        want = [step, micro, per_step, N, B, source]
        np.testing.assert_array_equal(identity[:, :6], np.tile(want, (8, 1)))
        np.testing.assert_array_equal(identity[:, 6], np.arange(8))  # row positions
        np.testing.assert_array_equal(identity[:, 7], np.full(8, 8))  # rows
    # The stream id is a function of the key, the same on every host.
    twin = sampling.PoissonSampler(
        N, B, physical_batch_size=8, secret_key=int(sampler.key.numpy()) + 2**63
    )
    assert int(twin.source_id.numpy()) == int(source)
    assert int(sampling.PoissonSampler(N, B).source_id.numpy()) != int(source)


def test_a_small_constant_sampling_key_warns_that_the_batches_are_not_secret():
    # Review: secret_key=1 was taken silently; a key of new_secret_key() is
    # a 64-bit draw (below 2**32 with chance 2**-32), which stays silent.
    with pytest.warns(NotPrivateWarning, match="small constant"):
        sampling.PoissonSampler(N, B, secret_key=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotPrivateWarning)
        sampling.PoissonSampler(N, B, secret_key=2**40 + 12345)
