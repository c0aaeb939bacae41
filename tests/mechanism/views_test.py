"""Views keyed by (step key, example, view): the same on every host and after a resume.

Each image's random draws come from its own key (`views.ViewKeys`), so an
example's views do not depend on the micro-batch, the shard or the row it
lands in, and a run resumed at step t draws step t's views again.
"""

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

import tan_keras
from tan_keras.data import augment
from tan_keras.mechanism import sampling, views

KEY = tf.constant([123456789, -987654321], tf.int64)


def _uniforms(keys):
    return keys.uniform().numpy()


def test_each_images_draw_is_uniform_and_independent_of_its_neighbours():
    ids = tf.range(100_000, dtype=tf.int64) * 256
    u = _uniforms(views.ViewKeys(KEY, ids))
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    # Adjacent ids (the next draw of an image, the next view, the next
    # example) and another step key give unrelated values.
    for other in (
        views.ViewKeys(KEY, ids + 1),
        views.ViewKeys(KEY, ids + 256),
        views.ViewKeys(KEY + 1, ids),
    ):
        assert abs(np.corrcoef(u, _uniforms(other))[0, 1]) < 0.02


def test_power_check_a_weak_mixer_fails_the_neighbour_test():
    # TensorFlow's index_shuffle (4 rounds) keyed the same way: adjacent ids
    # come out strongly correlated, which the test above would reject.
    ids = tf.range(100_000, dtype=tf.int64) * 256
    weak = [
        tf.random.experimental.index_shuffle(i, KEY, tf.constant(2**63 - 1, tf.int64))
        for i in (ids, ids + 1)
    ]
    a, b = (tf.cast(w, tf.float64).numpy() / 2.0**63 for w in weak)
    assert abs(np.corrcoef(a, b)[0, 1]) > 0.1


def _views_by_example(dataset, elements):
    """{(element, example): its views} over the first `elements` elements."""
    found = {}
    for index, (x, y, mask, _, _) in enumerate(dataset.take(elements)):
        for row in np.flatnonzero(mask.numpy()):
            found[(index, int(y[row]))] = x[row].numpy()
    return found


def _pipeline(num_shards=1, shard_index=0, sampler=None):
    n = 60
    images = np.random.default_rng(0).uniform(size=(n, 8, 8, 3)).astype(np.float32)
    sampler = sampler or sampling.PoissonSampler(n, 16, physical_batch_size=32, secret_key=77)
    augmenter = augment.make_augmenter("cifar", (8, 8, 3))
    return tan_keras.make_poisson_dataset(
        images,
        np.arange(n),  # the label is the example's index
        sampler,
        augmult=3,
        augmenter=augmenter,
        num_shards=num_shards,
        shard_index=shard_index,
    )


def test_two_hosts_draw_the_same_views_for_the_same_example():
    whole = _views_by_example(_pipeline(), 4)
    shards = {}
    for shard in (0, 1):
        shards.update(_views_by_example(_pipeline(2, shard), 4))
    assert shards.keys() == whole.keys() and len(whole) > 20
    for key, want in whole.items():
        np.testing.assert_array_equal(shards[key], want, err_msg=str(key))


def test_views_differ_across_views_and_steps():
    found = _views_by_example(_pipeline(), 6)
    first = next(iter(found.values()))
    assert not np.array_equal(first[0], first[1])  # two views of one example
    by_example = {}
    for (_, example), x in found.items():
        by_example.setdefault(example, []).append(x)
    repeated = [xs for xs in by_example.values() if len(xs) > 1]
    assert repeated  # an example sampled at two steps gets other views
    assert all(not np.array_equal(xs[0], xs[1]) for xs in repeated)


def test_a_resumed_sampler_draws_the_same_views_again():
    uninterrupted = list(_pipeline().take(3))
    sampler = sampling.PoissonSampler(60, 16, physical_batch_size=32, secret_key=77)
    sampler.resume_at(2)
    resumed = next(iter(_pipeline(sampler=sampler)))
    for got, want in zip(resumed[:2], uninterrupted[2][:2]):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_too_many_views_are_refused():
    with pytest.raises(ValueError, match="Invalid value for `augmult`"):
        views.make_views(tf.zeros([2, 8, 8, 3]), 257, augment.make_augmenter("cifar", (8, 8, 3)))


def test_a_custom_augmenter_taking_a_seed_gets_a_plain_seed_per_example():
    # A user's augmenter written for stateless [2] seeds must keep working
    # (ViewKeys would crash it); it is called on one example at a time, and
    # each example gets a seed of its own, the same whichever row holds it.
    seeds = []

    def flip(images, seed):
        seeds.append(seed)
        return tf.image.stateless_random_flip_left_right(images, seed)

    n = 60
    images = np.random.default_rng(0).uniform(size=(n, 8, 8, 3)).astype(np.float32)
    sampler = sampling.PoissonSampler(n, 30, physical_batch_size=8, secret_key=77)
    dataset = tan_keras.make_poisson_dataset(
        images, np.arange(n), sampler, augmult=2, augmenter=flip
    )
    x = next(iter(dataset))[0]
    assert x.shape == (8, 2, 8, 8, 3) and all(s.shape == (2,) for s in seeds)

    def seeds_for(ids):
        seeds.clear()
        views.make_views(tf.constant(images[:4]), 2, flip, seed=KEY, example_ids=ids)
        return [s.numpy() for s in seeds]

    first = seeds_for(tf.constant([0, 1, 2, 3], tf.int64))
    assert len({tuple(s) for s in first}) == 4  # one seed per example
    np.testing.assert_array_equal(seeds_for(tf.constant([0, 1, 2, 3], tf.int64)), first)
    moved = seeds_for(tf.constant([9, 0, 2, 3], tf.int64))
    np.testing.assert_array_equal(moved[1], first[0])  # example 0 in another row
    assert not np.array_equal(moved[0], first[0])
