"""Review round 8 (JAX): jax.debug.print in a layer or the loss.

`jax.debug.print` is the primitive `debug_print` (JAX 0.10), not a
callback: the trace check missed it, and a layer printed 46 training rows'
private values during a private fit. Refused now, like the callbacks.
"""

import jax
import keras
import numpy as np
import pytest
from keras import ops

import tan_keras
from tan_keras.jax_dp import traced_loss

ROWS, BATCH = 32, 8


class _PrintingLayer(keras.layers.Layer):
    def call(self, inputs):
        jax.debug.print("row {r}", r=inputs[..., 0])
        return inputs


def _printing_loss(y_true, y_pred):
    jax.debug.print("label {y}", y=y_true)
    return ops.mean(ops.square(y_true - y_pred), axis=-1)


def _fit(where):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, 4)).astype("float32")
    x[:, 0] = np.arange(ROWS) + 0.123456
    y = rng.normal(size=(ROWS, 1)).astype("float32")
    inputs = keras.Input((4,))
    hidden = _PrintingLayer()(inputs) if where == "layer" else inputs
    model = keras.Model(inputs, keras.layers.Dense(1)(hidden))
    dp_model = tan_keras.make_private(
        model, l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=BATCH, dataset_size=ROWS
    )
    dp_model.compile(keras.optimizers.SGD(0.1), _printing_loss if where == "loss" else "mse")
    try:
        dp_model.fit(x, y, epochs=1, verbose=0)
    finally:
        steps = int(dp_model.dp_steps)
    return steps


@pytest.mark.parametrize("where", ["layer", "loss"])
def test_jax_debug_print_is_refused_before_any_update(where):
    with pytest.raises(ValueError, match=r"`debug_print` primitive"):
        _fit(where)


def test_power_check_with_callbacks_only_the_layer_prints_private_markers(monkeypatch, capfd):
    def callbacks_only(jaxpr):
        for eqn, where in traced_loss._equations(jaxpr):
            if "callback" in eqn.primitive.name:
                return eqn.primitive.name, where
        return None

    monkeypatch.setattr(traced_loss, "_callback", callbacks_only)
    assert _fit("layer") > 0
    jax.effects_barrier()
    assert "123456" in capfd.readouterr().out
