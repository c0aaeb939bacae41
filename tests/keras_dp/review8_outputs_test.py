"""Review round 8: tf.print / tf.summary in training code (TensorFlow).

A `tf.print` in a layer, a loss, an augmenter or a metric printed the
training examples' values, and so which examples each secret Poisson step
drew (a review read the private markers of 58 rows). Refused before any
update, like a call into Python.
"""

import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import tan_keras
from tan_keras.mechanism import model_analysis

ROWS, BATCH = 32, 8
MARKER = 0.123456


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, 4)).astype("float32")
    x[:, 0] = np.arange(ROWS) + MARKER  # each row's private marker
    return x, rng.integers(0, 2, size=ROWS)


class _PrintingLayer(keras.layers.Layer):
    def call(self, inputs):
        tf.print("row", inputs[..., 0], output_stream=sys.stdout)
        return inputs


class _PrintingLoss(keras.losses.Loss):
    def call(self, y_true, y_pred):
        tf.print("prediction", y_pred[:, 0], output_stream=sys.stdout)
        return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)


class _PrintingMetric(keras.metrics.Mean):
    def update_state(self, y_true, y_pred, sample_weight=None):
        tf.print("prediction", y_pred[:, 0], output_stream=sys.stdout)
        return super().update_state(y_pred[:, 0])


def _summarizing(inputs):
    with tf.summary.create_file_writer("/tmp/unused").as_default():
        tf.summary.scalar("row", inputs[0, 0], step=0)
    return inputs


def _fit(where):
    inputs = keras.Input((4,))
    hidden = _PrintingLayer()(inputs) if where == "layer" else inputs
    model = keras.Model(inputs, keras.layers.Dense(2)(hidden))
    dp_model = tan_keras.make_private(
        model, l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=BATCH, dataset_size=ROWS
    )
    loss = (
        _PrintingLoss()
        if where == "loss"
        else keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    dp_model.compile(
        keras.optimizers.SGD(0.1), loss, metrics=[_PrintingMetric()] if where == "metric" else []
    )
    x, y = _data()
    try:
        if where in ("augmenter", "summary"):
            augmenter = (
                (lambda t: (tf.print("row", t[..., 0]), t)[1])
                if where == "augmenter"
                else _summarizing
            )
            sampler = tan_keras.PoissonSampler(ROWS, BATCH)
            dataset = tan_keras.make_poisson_dataset(x, y, sampler, augmenter=augmenter)
            dp_model.fit(dataset, epochs=1, steps_per_epoch=ROWS // BATCH, verbose=0)
        else:
            dp_model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    finally:
        steps = int(dp_model.dp_steps)
    return steps


@pytest.mark.parametrize("where", ["layer", "loss", "metric", "augmenter", "summary"])
def test_training_code_writing_tensors_out_is_refused_before_any_update(where):
    # (A summary's writer is a resource the code writes: refused as such.)
    with pytest.raises(ValueError, match=r"PrintV2 op \(tf.print, tf.summary\)|write_summary"):
        _fit(where)


def test_power_check_without_the_refusal_the_layer_prints_private_markers(monkeypatch, capfd):
    monkeypatch.setattr(model_analysis, "OUTPUT_OPS", frozenset())
    assert _fit("layer") > 0
    printed = capfd.readouterr().out
    assert "123456" in printed  # some row's private marker reached the console
