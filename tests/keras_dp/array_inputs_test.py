"""`fit(x, y, batch_size=B, epochs=E, validation_split=...)` on arrays, sampled by the model.

A Keras user's first call. The model draws Poisson batches of expected size
B from the training rows itself (each row carrying its sampling identity, as
from make_poisson_dataset): about E * N / B noisy updates, the held-out rows
of `validation_split` never trained on, and every mismatch refused before
any update.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tan_keras
from tan_keras.mechanism import noise, sampling

N, B = 64, 8
DP = dict(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=B, dataset_size=N)


def _data(rows=N):
    rng = np.random.default_rng(0)
    return rng.normal(size=(rows, 4)).astype(np.float32), rng.integers(0, 3, rows)


def _private(**overrides):
    inputs = keras.Input((4,))
    base = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Dense(5)(inputs)))
    model = tan_keras.make_private(base, **{**DP, **overrides})
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def test_arrays_train_about_n_over_b_poisson_updates_per_epoch():
    model = _private()
    x, y = _data()
    history = model.fit(x, y, batch_size=B, epochs=2, verbose=0)
    # ceil(N / B) micro-batches per epoch; a logical step larger than the
    # physical batch (probability ~1e-5 here) takes two.
    assert int(model.dp_steps.numpy()) in (15, 16)
    assert len(history.history["loss"]) == 2
    # A second fit continues the ledger's sampling position.
    model.fit(x, y, epochs=1, verbose=0)
    assert int(model.dp_steps.numpy()) in (22, 23, 24)
    assert int(model.sampling_position) == int(model.dp_steps.numpy())


def test_validation_split_holds_out_the_last_rows_before_sampling(monkeypatch):
    seen = []
    original = sampling.make_poisson_dataset

    def spy(features, labels, sampler, **kwargs):
        seen.append((np.asarray(features), sampler.dataset_size))
        return original(features, labels, sampler, **kwargs)

    monkeypatch.setattr(sampling, "make_poisson_dataset", spy)
    x, y = _data(80)
    model = _private()  # dataset_size 64 = 80 * (1 - 0.2)
    history = model.fit(x, y, batch_size=B, validation_split=0.2, verbose=0)
    ((features, dataset_size),) = seen
    np.testing.assert_array_equal(features, x[:64])
    assert dataset_size == 64
    assert "val_loss" in history.history and "val_accuracy" in history.history


def test_dict_inputs_train():
    a, b = keras.Input((2,), name="a"), keras.Input((2,), name="b")
    base = keras.Model({"a": a, "b": b}, keras.layers.Dense(3)(keras.layers.Concatenate()([a, b])))
    model = tan_keras.make_private(base, **DP)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = _data()
    model.fit({"a": x[:, :2], "b": x[:, 2:]}, y, batch_size=B, epochs=1, verbose=0)
    assert int(model.dp_steps.numpy()) in (7, 8)


@pytest.mark.parametrize(
    "arguments, rows, message",
    [
        (dict(batch_size=16), N, "batch_size.*\\[1, 8\\].*expected_batch_size \\(8\\)"),
        (dict(batch_size=B), N + 1, "dataset_size.*65"),
        (dict(validation_split=0.5), N, "dataset_size.*32 \\(64 rows less validation_split"),
        (dict(validation_split=1.5), N, "validation_split"),
        (dict(sample_weight=np.ones(N)), N, "sample_weight"),
        (dict(y=None), N, "`y`"),
    ],
)
def test_mismatches_are_refused_before_any_update(arguments, rows, message):
    model = _private()
    weights = [w.copy() for w in model.get_weights()]
    x, y = _data(rows)
    call = {"y": y, **arguments}
    with pytest.raises(ValueError, match=message):
        model.fit(x, verbose=0, **call)
    assert int(model.dp_steps.numpy()) == 0
    for before, after in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(before, after)


def test_caller_poisson_arrays_are_refused_with_what_to_do():
    model = _private(sampling="caller_poisson")
    x, y = _data()
    with pytest.raises(ValueError, match="sampling.*'poisson' to train on in-memory arrays"):
        model.fit(x, y, batch_size=B, verbose=0)


def test_batches_really_are_poisson_sampled(monkeypatch):
    """The arrays are never cut by Keras: every micro-batch has a Poisson identity."""
    model = _private()
    x, y = _data()
    seen = []
    original = type(model).train_step

    def spy(self, data):
        seen.append(len(data))
        return original(self, data)

    monkeypatch.setattr(type(model), "train_step", spy)
    model.fit(x, y, batch_size=B, epochs=1, verbose=0)
    assert seen and set(seen) == {5}  # (x, y, mask, step_end, identity)


def test_a_smaller_batch_size_is_the_micro_batch_of_larger_logical_steps(monkeypatch):
    """fit(batch_size=P < B): micro-batches of P rows, accumulated into steps of expected size B.

    A keras.io script keeps `batch_size=32` (its memory) while the privacy
    plan draws batches of expected size B; the noisy update still comes once
    per logical step (the ledger counts steps, not micro-batches) and an
    epoch still holds about N / B of them.
    """
    model = _private()
    x, y = _data()
    rows = []  # the traced micro-batch shapes
    original = type(model).train_step

    def spy(self, data):
        rows.append(int(data[0].shape[0]))
        return original(self, data)

    monkeypatch.setattr(type(model), "train_step", spy)
    batches = []
    counter = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: batches.append(b))
    history = model.fit(x, y, batch_size=3, epochs=4, verbose=0, callbacks=[counter])
    assert rows and set(rows) == {3}
    # Every step padded to the micro-batches of B + 4 std = 19 rows: 7 of 3.
    per_step = sampling.PoissonSampler(N, B, physical_batch_size=3, pad_steps=True).steps_padded_to
    assert per_step == 7
    assert len(batches) == 4 * N // B * per_step
    assert len(history.history["loss"]) == 4
    steps = int(model.dp_steps.numpy())
    # 4 epochs of exactly 8 logical steps, unless a step spilled into an 8th
    # micro-batch (probability about 7e-5 per step), which leaves the last
    # step of the fit unfinished.
    assert steps in (31, 32), steps
    assert int(model.sampling_position) == steps


def _fixed_sampling_key(monkeypatch, key=12345):
    # A test-only fixed key: the draws, so the test, are deterministic.
    monkeypatch.setattr(sampling, "entropy_int64", lambda: key)


def _keras_batches_per_step(model, x, y, **fit_arguments):
    """The Keras batches (on_train_batch_end calls) of each completed logical step."""
    counts, pending = [], [0, 0]  # [batches since the last update, updates seen]

    def on_batch_end(batch, logs):
        pending[0] += 1
        steps = int(model.dp_steps.numpy())
        if steps > pending[1]:
            counts.append(pending[0])
            pending[:] = [0, steps]

    callback = keras.callbacks.LambdaCallback(on_train_batch_end=on_batch_end)
    model.fit(x, y, verbose=0, callbacks=[callback], **fit_arguments)
    return counts


def test_every_logical_step_is_the_same_number_of_keras_batches(monkeypatch):
    """fit(batch_size=P < B) pads every step: its Keras batches do not count its Poisson size.

    Unpadded, a step is ceil(n / P) micro-batches for its realized size n, and
    a callback, the progress bar or the batches per epoch read n without noise.
    """
    _fixed_sampling_key(monkeypatch)
    x, y = _data()
    counts = _keras_batches_per_step(_private(), x, y, batch_size=2, epochs=3)
    per_step = sampling.PoissonSampler(N, B, physical_batch_size=2, pad_steps=True).steps_padded_to
    assert counts == [per_step] * (3 * N // B), counts


def test_power_check_unpadded_steps_reveal_their_poisson_size(monkeypatch):
    """The same count, with the padding taken away, varies from step to step."""
    _fixed_sampling_key(monkeypatch)
    original = sampling.PoissonSampler

    def unpadded(*arguments, **keywords):
        sampler = original(*arguments, **keywords)
        sampler.pad_steps = False  # by hand: the argument is refused below B + 4 std
        return sampler

    monkeypatch.setattr(sampling, "PoissonSampler", unpadded)
    x, y = _data()
    counts = _keras_batches_per_step(_private(), x, y, batch_size=2, steps_per_epoch=40)
    assert len(counts) >= 5 and len(set(counts)) > 1, counts


def test_padded_micro_batches_add_up_to_one_update_divided_by_b(monkeypatch):
    """One padded step of micro-batches of 2 rows = the same step as one micro-batch.

    Same key, so the same Poisson sample; noise taken away, so the updates
    compare exactly: the clipped sum accumulated over the padded
    micro-batches, noised once, divided by B as the one-micro-batch step.
    """
    _fixed_sampling_key(monkeypatch)
    draws = tf.Variable(0, dtype=tf.int64, trainable=False)  # counted when run
    original = noise.add_gaussian_noise

    def noiseless(grad_sum, stddev, seed):
        with tf.control_dependencies([draws.assign_add(1)]):
            return [tf.identity(g) for g in original(grad_sum, 0.0 * stddev, seed)]

    monkeypatch.setattr(noise, "add_gaussian_noise", noiseless)
    x, y = _data()
    per_step = sampling.PoissonSampler(N, B, physical_batch_size=2, pad_steps=True).steps_padded_to
    updated = []
    for batch_size, micro_batches in ((2, per_step), (B, 1)):
        keras.utils.set_random_seed(7)
        model = _private()
        start = [v.numpy() for v in model.trainable_variables]
        model.fit(x, y, batch_size=batch_size, steps_per_epoch=micro_batches, epochs=1, verbose=0)
        assert int(model.dp_steps.numpy()) == 1
        updated.append([v.numpy() - s for v, s in zip(model.trainable_variables, start)])
    assert int(draws.numpy()) == 2  # once per fit's one logical step
    assert any(np.abs(u).max() > 0 for u in updated[1])
    for accumulated, single in zip(*updated):
        np.testing.assert_allclose(accumulated, single, atol=1e-6)


def test_mean_micro_batches_counts_the_spill_of_large_poisson_batches():
    # B = P: a step larger than B (probability about one half) takes two.
    sampler = sampling.PoissonSampler(9600, 256, physical_batch_size=256)
    sampler.pad_steps = False  # by hand: the argument is refused below B + 4 std
    assert 1.45 < sampling.mean_micro_batches(sampler) < 1.52
    # The default P = B + 4 std almost never spills.
    assert sampling.mean_micro_batches(sampling.PoissonSampler(9600, 256)) < 1.001
    padded = sampling.PoissonSampler(9600, 256, physical_batch_size=32, pad_steps=True)
    assert sampling.mean_micro_batches(padded) >= padded.steps_padded_to == 10


def test_at_batch_size_b_a_step_above_the_padded_size_spills_whole(monkeypatch):
    """At batch_size=B a step is one micro-batch of B + 4 std = 19 rows; a larger one spills.

    As `PoissonSampler` documents: never truncated, its second micro-batch
    part of the same update (the 3e-5 tail where the layout shows n).
    """
    x, y = _data()
    monkeypatch.setattr(
        sampling.PoissonSampler, "sample_indices", lambda self, step: tf.range(30, dtype=tf.int64)
    )
    model = _private()
    counts = _keras_batches_per_step(model, x, y, batch_size=B, epochs=1)
    # 8 micro-batches (one per expected step), two per 30-row step: 4 updates.
    assert counts == [2, 2, 2, 2], counts
    assert int(model.dp_steps.numpy()) == 4
