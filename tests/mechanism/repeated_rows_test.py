"""Training data holding an example twice is refused where the package takes arrays."""

import numpy as np
import pytest

from tan_keras import _repeated_rows
from tan_keras.mechanism import sampling


def _data(rows=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(rows, 5)).astype("float32"), rng.integers(0, 3, rows)


def test_first_repeat_names_the_earlier_row_the_repeating_row_and_the_count():
    x, y = _data()
    assert _repeated_rows.first_repeat(x, y) is None
    x[9], y[9] = x[2], y[2]
    x[20], y[20] = x[2], y[2]
    assert _repeated_rows.first_repeat(x, y) == (2, 9, 2)
    # Power check: the same inputs with another label are another example.
    y[9], y[20] = (y[2] + 1) % 3, (y[2] + 2) % 3
    assert _repeated_rows.first_repeat(x, y) is None


def test_rows_compare_across_every_input_strings_included():
    x, y = _data(8)
    names = np.array(["ann", "bob", "cy", "dee", "ed", "flo", "gus", "hal"], dtype=object)
    features = {"numbers": x, "name": names}
    x[5] = x[1]
    y[5] = y[1]
    assert _repeated_rows.first_repeat(features, y) is None  # the names differ
    names[5] = "bob"
    assert _repeated_rows.first_repeat(features, y) == (1, 5, 1)


def test_make_poisson_dataset_refuses_a_repeated_example_unless_declared_distinct_people():
    x, y = _data()
    x[7], y[7] = x[0], y[0]
    sampler = sampling.PoissonSampler(32, 8)
    with pytest.raises(ValueError, match=r"row 7 equals row 0"):
        sampling.make_poisson_dataset(x, y, sampler)
    sampling.make_poisson_dataset(x, y, sampler, repeated_rows="distinct_people")
    with pytest.raises(ValueError, match="`repeated_rows`"):
        sampling.make_poisson_dataset(x, y, sampler, repeated_rows="yes")


def test_inputs_of_one_number_per_row_are_not_compared():
    # A single category per row (a zip code): equal values are the column's
    # nature. Power check: two numbers per row are compared.
    codes = np.array([94110] * 6 + [10001] * 2)[:, None]
    labels = np.arange(8) % 2
    assert _repeated_rows.first_repeat(codes, labels) is None
    assert _repeated_rows.first_repeat(np.concatenate([codes, codes], 1), labels) == (0, 2, 4)


def test_fit_refuses_repeated_rows_given_with_a_pipeline_it_does_not_compare():
    # Accepted and ignored, the argument would read as a check that ran.
    import keras

    import tan_keras

    x, y = _data()
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    private = tan_keras.make_private(
        model, l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=8, dataset_size=32
    )
    private.compile(
        optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    pipeline = sampling.make_poisson_dataset(x, y, sampling.PoissonSampler(32, 8))
    with pytest.raises(ValueError, match=r"`repeated_rows`: expected it only with in-memory"):
        private.fit(pipeline, steps_per_epoch=1, verbose=0, repeated_rows="distinct_people")
    assert int(private.dp_steps.numpy()) == 0
    private.fit(pipeline, steps_per_epoch=1, verbose=0)  # the power check: without it, it trains
    assert int(private.dp_steps.numpy()) >= 1


def test_a_record_shared_across_two_arrays_is_found_across_all_its_columns():
    # keras.io's structured data: a dict of one-column features. A held-out
    # record equal to a training one in every column is a copy.
    rng = np.random.default_rng(0)
    train = {"age": rng.integers(18, 90, (20, 1)), "hours": rng.normal(size=(20, 1))}
    held = {name: column[:3].copy() for name, column in train.items()}
    held["age"][1:], held["hours"][1:] = 200, -50.0  # rows 1, 2: new records
    assert _repeated_rows.shares_a_record(train, held)
    # Power: each column's values appear on the training side, but no whole
    # record does (row 0's age with row 1's hours).
    mixed = {"age": train["age"][:1], "hours": train["hours"][1:2]}
    assert not _repeated_rows.shares_a_record(train, mixed)
    held["age"][0] = 91
    assert not _repeated_rows.shares_a_record(train, held)
    # One number per row is not compared (equal values are what it holds).
    assert not _repeated_rows.shares_a_record(train["age"][:, 0], train["age"][:3, 0])
