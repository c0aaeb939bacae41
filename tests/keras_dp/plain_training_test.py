"""A plain Keras model training private weights is refused (`dp_model._refuse_plain_training`).

After `private = make_private(model)`, `model.fit(...)` is an easy slip: the
two share their layers, so the private weights would move with no clipping
or noise while the ledger kept its count (review round 8: weights moved,
ledger still 4 updates). Power check: without the refusal it trains.
A plain copy of private weights trains plainly, and the values it leaves
keep the history of those it started from.
"""

import contextlib

import keras
import numpy as np
import pytest
from _helpers import LOSS

import tan_keras
from tan_keras.keras_dp import ledger as ledger_lib

N, B = 64, 16
DP = dict(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=B, dataset_size=N)


def _setup():
    x = np.random.default_rng(0).normal(size=(N, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Dense(2)(inp))
    private = tan_keras.make_private(model, **DP)
    private.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    return model, private, x, y


@pytest.mark.parametrize("method", ["fit", "train_on_batch"])
def test_plain_training_of_the_wrapped_model_is_refused(method):
    model, private, x, y = _setup()
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError, match=f"Invalid call of `{method}`"):
        getattr(model, method)(x, y)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    model.evaluate(x, y, verbose=0)  # reading is fine
    private.fit(x, y, batch_size=B, verbose=0)
    assert int(private.dp_steps) > 0


def test_a_new_head_on_frozen_private_layers_trains_plainly():
    model, private, x, y = _setup()
    for layer in model.layers:
        layer.trainable = False
    head = keras.Model(model.inputs, keras.layers.Dense(2)(model.outputs[0]))
    head.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    head.fit(x, y, verbose=0)


def test_power_check_without_the_refusal_the_private_weights_move_unaccounted():
    model, private, x, y = _setup()
    original = keras.Model.fit.__wrapped__
    before = model.get_weights()[0].copy()
    original(model, x, y, epochs=1, verbose=0)
    assert not np.array_equal(before, model.get_weights()[0])
    assert int(private.dp_steps) == 0


@pytest.mark.parametrize("power_check", [False, True])
@pytest.mark.parametrize("method", ["fit", "train_on_batch"])
def test_a_copy_of_private_weights_trained_plainly_keeps_their_history(
    method, power_check, monkeypatch
):
    """Review round 8, escape 05: a clone of private weights, a plain public step, private."""
    if power_check:  # the new values are not remembered
        monkeypatch.setattr(
            ledger_lib, "carried_through_plain_training", lambda model: contextlib.nullcontext()
        )
    model, private, x, y = _setup()
    private.fit(x, y, batch_size=B, verbose=0)
    spent = private.privacy_ledger.total_steps()
    assert spent > 0
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    copy.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    public = np.random.default_rng(1).normal(size=(8, 4)).astype(np.float32)
    getattr(copy, method)(
        public, np.zeros(8, np.int32), **({"verbose": 0} if method == "fit" else {})
    )
    assert not np.array_equal(copy.get_weights()[0], model.get_weights()[0])
    again = tan_keras.make_private(copy, **DP)
    assert again.privacy_ledger.total_steps() == (0 if power_check else spent)


@pytest.mark.parametrize("power_check", [False, True])
def test_a_private_kernel_transposed_into_a_tied_decoder_keeps_its_history(
    power_check, monkeypatch
):
    """Review round 9, E4: `Dense(...).set_weights([W.T, b])` (an autoencoder's tied decoder)."""
    if power_check:
        monkeypatch.setattr(ledger_lib, "_rearranged_fingerprints", lambda variable: [])
    model, private, x, y = _setup()
    private.fit(x, y, batch_size=B, verbose=0)
    spent = private.privacy_ledger.total_steps()
    kernel = model.layers[-1].kernel.numpy()  # (4, 2)
    inp = keras.Input((2,))
    decoder = keras.Model(inp, keras.layers.Dense(4)(inp))
    decoder.set_weights([kernel.T, np.zeros(4, np.float32)])
    again = tan_keras.make_private(decoder, **DP)
    assert again.privacy_ledger.total_steps() == (0 if power_check else spent)
