"""Model structures and loss terms the DP step cannot honour are refused clearly.

Each used to crash deep inside TensorFlow or, worse, train something else
than asked (a loss term dropped). Several inputs and outputs are supported
(tests/keras_dp/structured_io_test.py), and so are string inputs mapped to
numbers by Keras preprocessing layers (string_inputs_test.py).
"""

import os
import subprocess
import sys

import keras
import pytest
import tensorflow as tf

from tan_keras.keras_dp.dp_model import DPKerasModel, make_private

DP = dict(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=8, dataset_size=100)


def _wrap(inputs, outputs):
    return DPKerasModel(inputs=inputs, outputs=outputs, **DP)


class _DataLoss(keras.layers.Layer):
    def call(self, x):
        self.add_loss(tf.reduce_mean(tf.square(x)))
        return x


def test_a_layer_adding_a_data_dependent_loss_is_refused():
    inp = keras.Input((4,))
    out = keras.layers.Dense(3)(_DataLoss(name="penalty")(inp))
    with pytest.raises(ValueError, match="Layer `penalty` calls add_loss"):
        _wrap(inp, out)


def test_weight_regularizers_are_accepted():
    # Power check: a penalty on the weights alone is not a call loss.
    inp = keras.Input((4,))
    _wrap(inp, keras.layers.Dense(3, kernel_regularizer="l2")(inp))


def test_add_loss_on_the_model_is_refused():
    inp = keras.Input((4,))
    model = _wrap(inp, keras.layers.Dense(3)(inp))
    with pytest.raises(ValueError, match="DPKerasModel.add_loss is not supported"):
        model.add_loss(tf.constant(1.0))


@pytest.mark.parametrize("rnn", [keras.layers.LSTM, keras.layers.GRU, keras.layers.SimpleRNN])
def test_a_recurrent_layer_must_be_unrolled(rnn):
    inp = keras.Input((5,), dtype="int32")
    h = keras.layers.Embedding(20, 4)(inp)
    with pytest.raises(ValueError, match="unroll=True"):
        _wrap(inp, keras.layers.Dense(2)(rnn(3, name="rec")(h)))
    # Power check: unrolled, it is accepted (and its per-example gradients are
    # tested against a loop in tests/mechanism/per_example_test.py).
    _wrap(inp, keras.layers.Dense(2)(rnn(3, unroll=True)(h)))


_ATTENTION = """
import keras, numpy as np
from tan_keras.keras_dp import model_checks
from tan_keras.keras_dp.dp_model import DPKerasModel
inp = keras.Input((4, 6))
h = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3, name="mha")(inp, inp)
out = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling1D()(h))
model = DPKerasModel(inp, out, l2_norm_clip=1.0, noise_multiplier=1.0,
                     expected_batch_size=8, dataset_size=32)
model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
x = np.random.default_rng(0).normal(size=(32, 4, 6)).astype("float32")
model.fit(x, np.arange(32) % 2, batch_size=8, epochs=1, verbose=0)
print("trained", int(model.dp_steps.numpy()) == 4, model._one_at_a_time)
"""


@pytest.mark.parametrize("onednn, one_at_a_time", [("1", True), ("0", False)])
def test_attention_trains_where_onednn_would_abort_the_vectorized_map(onednn, one_at_a_time):
    # oneDNN is fixed when TensorFlow loads, so each setting gets its own
    # process. With it, the per-example gradients of an Einsum under
    # tf.vectorized_map abort TensorFlow on CPU (measured on TF 2.21): the
    # model takes them one example at a time (exact: per_example_test).
    if tf.config.list_logical_devices("GPU"):
        pytest.skip("oneDNN's abort concerns CPU-only machines")
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=onednn, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(
        [sys.executable, "-c", _ATTENTION], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == f"trained True {one_at_a_time}"


class OwnStepModel(DPKerasModel):
    def train_step(self, data):  # e.g. a plain Keras step: no clipping, no noise
        return {}


class OwnEvaluationModel(DPKerasModel):
    def test_step(self, data):
        return super().test_step(data)


def test_a_subclass_overriding_the_training_step_is_refused():
    inp = keras.Input((4,))
    with pytest.raises(ValueError, match="overrides train_step"):
        OwnStepModel(inputs=inp, outputs=keras.layers.Dense(3)(inp), **DP)
    # Power check: overriding the evaluation step is fine.
    OwnEvaluationModel(inputs=inp, outputs=keras.layers.Dense(3)(inp), **DP)


class CustomLossModel(keras.Model):
    def compute_loss(self, *args, **kwargs):
        return super().compute_loss(*args, **kwargs) * 2.0


def test_make_private_refuses_a_model_whose_loss_would_be_skipped():
    inp = keras.Input((4,))
    model = CustomLossModel(inp, keras.layers.Dense(3)(inp))
    with pytest.raises(ValueError, match="overrides compute_loss"):
        make_private(model, **DP)
    make_private(keras.Model(inp, keras.layers.Dense(3)(inp)), **DP)  # power check
