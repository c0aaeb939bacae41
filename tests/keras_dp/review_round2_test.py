"""Escapes found by the second adversarial review (its scripts, as tests).

* A mapped warm-up branch concatenated before the plain Poisson pipeline
  (`p.take(2).map(mixup).concatenate(p)`): only the first branch that
  reached the pipeline was checked, so the map was never seen; one absent
  example moved the update by 1.78 lr*C/B. Every branch is checked now.
* Padding rows gathered example 0, so any function over a micro-batch (a
  generator standardizing each batch) reached an example the step had not
  sampled (6.12 lr*C/B). Padding rows are zeros now.
* A lookup marked public and then adapted again with tf-idf output kept its
  vocabulary and changed its idf weights, which the mark did not cover.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from _helpers import dense_model, dp_model

import tan_keras
from tan_keras.mechanism import sampling

N, B = 64, 16
DP = dict(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=B, dataset_size=N)


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(N, 4)).astype(np.float32), rng.integers(0, 3, N).astype(np.int32)


def _pipeline(physical=None):
    x, y = _data()
    sampler = sampling.PoissonSampler(N, B, physical_batch_size=physical)
    return sampling.make_poisson_dataset(x, y, sampler)


def _mixup(x, y, mask, step_end, identity):
    return (x + tf.reverse(x, [0])) / 2, y, mask, step_end, identity


def test_a_mapped_branch_concatenated_to_the_pipeline_is_refused():
    model = dp_model(dense_model(), **DP)
    pipeline = _pipeline()
    warm_up = pipeline.take(2).map(_mixup).concatenate(pipeline)
    with pytest.raises(ValueError, match="transformed by Map"):
        model.fit(warm_up, steps_per_epoch=3, verbose=0)
    assert int(model.dp_steps.numpy()) == 0
    # Element selections on every branch still pass.
    assert sampling.poisson_source(pipeline.take(2).concatenate(pipeline).prefetch(1))


def _padding_rows(physical=N):
    x, _ = _data()
    rows = []
    for features, labels, mask, _, _ in _pipeline(physical).take(4):
        rows.append((features.numpy()[mask.numpy() == 0], labels.numpy()[mask.numpy() == 0]))
    return x, rows


def test_padding_rows_hold_no_example():
    _, rows = _padding_rows()
    assert sum(len(f) for f, _ in rows) > 0
    for features, labels in rows:
        assert not np.any(features) and not np.any(labels)


def test_power_check_padding_gathered_unzeroed_holds_example_0(monkeypatch):
    monkeypatch.setattr(sampling, "_padding_zeroed", lambda rows, mask: rows)
    x, rows = _padding_rows()
    features = np.concatenate([f for f, _ in rows])
    assert len(features) > 0 and np.all(features == x[0])


def test_tf_idf_weights_adapted_again_void_the_public_mark():
    rng = np.random.default_rng(0)
    public = rng.choice(np.arange(1, 6), size=(200, 6), p=[0.4, 0.25, 0.2, 0.1, 0.05])
    private = rng.choice(np.arange(1, 6), size=(N, 6), p=[0.3, 0.28, 0.22, 0.12, 0.08])
    lookup = keras.layers.IntegerLookup(output_mode="tf_idf")
    lookup.adapt(public)
    tan_keras.mark_public(lookup, reason="adapted on a public corpus")
    vocabulary, idf = lookup.get_vocabulary(), np.array(lookup.idf_weights)
    inputs = keras.Input((6,), dtype="int64")
    model = keras.Model(inputs, keras.layers.Dense(2)(lookup(inputs)))
    tan_keras.make_private(model, **DP)  # the marked state is accepted
    lookup.adapt(private)
    assert lookup.get_vocabulary() == vocabulary  # only the idf weights moved
    assert not np.allclose(np.array(lookup.idf_weights), idf)
    with pytest.raises(ValueError, match="changed since it was declared public"):
        tan_keras.make_private(model, **DP)


class _OwnTable(keras.layers.Layer):
    """A custom embedding: reads its own table with keras.ops.take (no id check)."""

    def build(self, input_shape):
        self.table = self.add_weight(shape=(10, 3), initializer="ones")

    def call(self, ids):
        return keras.ops.sum(keras.ops.take(self.table, keras.ops.cast(ids, "int32"), axis=0), 1)


SECRET_ID = 4242


def _custom_table_fit():
    inputs = keras.Input((3,))
    model = dp_model(keras.Model(inputs, keras.layers.Dense(3)(_OwnTable()(inputs))), **DP)
    x = np.ones((N, 3), np.float32)
    x[:, 2] = SECRET_ID  # every sampled example carries the private id
    _, y = _data()
    model.fit(
        # (Equal rows on purpose: each is its own person here.)
        sampling.make_poisson_dataset(
            x, y, sampling.PoissonSampler(N, B), repeated_rows="distinct_people"
        ),
        steps_per_epoch=1,
        verbose=0,
    )


def test_an_error_from_inside_the_step_withholds_the_private_value():
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        _custom_table_fit()
    message = str(raised.value)
    assert str(SECRET_ID) not in message and "withheld" in message
    # No original to print, through __cause__ or __context__ (it holds the value).
    assert raised.value.__cause__ is None and raised.value.__context__ is None


def test_power_check_tensorflow_s_own_message_names_the_value():
    # Where the train function looks it up (dp_model re-exports it).
    from tan_keras.keras_dp import fit_entry

    original = fit_entry.scrubbed_error
    try:
        fit_entry.scrubbed_error = lambda error: error
        with pytest.raises(tf.errors.InvalidArgumentError, match=str(SECRET_ID)):
            _custom_table_fit()
    finally:
        fit_entry.scrubbed_error = original
