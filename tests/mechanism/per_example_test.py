"""Per-example gradients equal a loop of single-example gradients."""

import logging
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from tan_keras.mechanism import per_example

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _model(kind):
    keras.utils.set_random_seed(1)
    layers = keras.layers
    if kind == "dense":
        inp = keras.Input((5,))
        out = layers.Dense(3)(layers.Dense(4, activation="tanh")(inp))
    elif kind == "conv_groupnorm":
        inp = keras.Input((6, 6, 2))
        h = layers.Conv2D(4, 3, activation="relu")(inp)
        h = layers.GroupNormalization(groups=2)(h)
        out = layers.Dense(3)(layers.Flatten()(h))
    elif kind == "layernorm":
        inp = keras.Input((5,))
        h = layers.LayerNormalization()(layers.Dense(6)(inp))
        out = layers.Dense(3)(h)
    elif kind == "embedding":
        inp = keras.Input((4,), dtype="int32")
        h = layers.Embedding(11, 3)(inp)
        out = layers.Dense(3)(layers.Flatten()(h))
    elif kind in ("lstm", "gru", "simple_rnn"):
        # Recurrent layers run per example only unrolled (model_checks).
        rnn = {"lstm": layers.LSTM, "gru": layers.GRU, "simple_rnn": layers.SimpleRNN}[kind]
        inp = keras.Input((4,), dtype="int32")
        h = layers.Embedding(11, 3)(inp)
        out = layers.Dense(3)(rnn(5, unroll=True)(h))
    elif kind == "attention":
        inp = keras.Input((4, 6))
        h = layers.MultiHeadAttention(num_heads=2, key_dim=3)(inp, inp)
        h = layers.LayerNormalization()(h + inp)
        out = layers.Dense(3)(layers.GlobalAveragePooling1D()(h))
    elif kind == "conv1d_depthwise":
        inp = keras.Input((6, 6, 2))
        h = layers.DepthwiseConv2D(3, activation="relu")(inp)
        h = layers.TimeDistributed(layers.Conv1D(3, 2))(h)
        out = layers.Dense(3)(layers.Flatten()(h))
    return keras.Model(inp, out)


def _inputs(kind, batch, views, rng):
    shape = {
        "dense": (5,),
        "conv_groupnorm": (6, 6, 2),
        "layernorm": (5,),
        "embedding": (4,),
        "lstm": (4,),
        "gru": (4,),
        "simple_rnn": (4,),
        "attention": (4, 6),
        "conv1d_depthwise": (6, 6, 2),
    }[kind]
    if kind in ("embedding", "lstm", "gru", "simple_rnn"):
        x = rng.integers(0, 11, size=(batch, views) + shape).astype(np.int32)
    else:
        x = rng.normal(size=(batch, views) + shape).astype(np.float32)
    y = rng.integers(0, 3, size=(batch,)).astype(np.int32)
    return x, y


KINDS = [
    "dense",
    "conv_groupnorm",
    "layernorm",
    "embedding",
    "lstm",
    "gru",
    "simple_rnn",
    "conv1d_depthwise",
]
# "attention" (MultiHeadAttention) runs vectorized in its own process below:
# on CPU, oneDNN's Einsum under tf.vectorized_map aborts the process
# (segmentation fault, TF 2.21), so DPKerasModel takes such models one
# example at a time there (model_checks.vectorizing_crashes).


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("views", [1, 3])
def test_matches_loop_of_single_example_gradients(kind, batch, views, one_at_a_time=False):
    model = _model(kind)
    x, y = _inputs(kind, batch, views, np.random.default_rng(batch * 10 + views))
    loss_fn = per_example.unreduced_loss_fn(LOSS)
    grads, losses, preds = per_example.per_example_gradients(
        model, loss_fn, tf.constant(x), tf.constant(y), one_at_a_time=one_at_a_time
    )
    for i in range(batch):
        with tf.GradientTape() as tape:
            logits = model(x[i], training=True)  # the K views of example i
            loss = tf.reduce_mean(loss_fn(np.repeat(y[i], views), logits))
        expected = tape.gradient(loss, model.trainable_variables, unconnected_gradients="zero")
        for got, want in zip(grads, expected):
            np.testing.assert_allclose(
                got[i].numpy(), tf.convert_to_tensor(want).numpy(), atol=1e-5
            )
        np.testing.assert_allclose(losses[i].numpy(), loss.numpy(), atol=1e-5)
        np.testing.assert_allclose(preds[i].numpy(), logits.numpy().mean(0), atol=1e-5)


@pytest.mark.parametrize("kind", ["attention", "dense"])
def test_one_example_at_a_time_matches_the_loop(kind):
    # The route for models whose vectorized form would crash: no pfor, so
    # it runs whatever oneDNN's setting.
    test_matches_loop_of_single_example_gradients(kind, 7, 3, one_at_a_time=True)


def test_as_views_adds_axis_for_k1_and_checks_k():
    x = tf.zeros([4, 5])
    assert per_example.as_views(x, 1, 2).shape == (4, 1, 5)
    assert per_example.as_views(tf.zeros([4, 3, 5]), 3, 2).shape == (4, 3, 5)
    with pytest.raises(ValueError, match="augmult=2"):
        per_example.as_views(x, 2, 2)
    with pytest.raises(ValueError, match="3 augmented views"):
        per_example.as_views(tf.zeros([4, 3, 5]), 2, 2)


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="`loss`"):
        per_example.unreduced_loss_fn("no_such_loss")


def test_only_pfors_while_loop_note_is_dropped_from_the_tensorflow_log():
    logger = tf.get_logger()
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        logger.warning("Conv2DBackpropFilter uses a while_loop. Fix that!")
        logger.warning("A real warning")
    finally:
        logger.removeHandler(handler)
    assert seen == ["A real warning"]


def test_attention_matches_the_loop_with_onednn_off():
    here = os.path.dirname(os.path.abspath(__file__))
    code = (
        f"import sys; sys.path[:0] = [{here!r}, {os.path.dirname(here)!r}]\n"
        "import per_example_test as t\n"
        "for batch in (1, 7):\n"
        "    t.test_matches_loop_of_single_example_gradients('attention', batch, 3)\n"
        "print('attention ok')"
    )
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0", TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("attention ok")
