"""Re-compiling after freezing or unfreezing layers: the DP state follows.

Fine-tuning freezes a backbone, trains, unfreezes and compiles again. The
accumulators and the EMA must then cover exactly the variables that train,
while the privacy ledger and the noise key carry on (no update forgotten, no
noise drawn twice).
"""

import keras
import numpy as np
import pytest
from _helpers import LOSS, dense_model, flat, one_step

from tan_keras.keras_dp.dp_model import DPKerasModel

DP = dict(l2_norm_clip=1.0, noise_multiplier=0.0, expected_batch_size=8, dataset_size=100)


def _data(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, 3, n).astype(np.int32)


def _model(ema_decay=None):
    base = dense_model()
    model = DPKerasModel(inputs=base.inputs, outputs=base.outputs, ema_decay=ema_decay, **DP)
    return model, model.layers[1]  # the hidden Dense layer


def _compile(model, lr=0.5):
    model.compile(optimizer=keras.optimizers.SGD(lr), loss=LOSS)


def test_unfreezing_and_recompiling_trains_the_new_layer_and_keeps_the_ledger():
    model, hidden = _model(ema_decay=0.9)
    x, y = _data()
    hidden.trainable = False
    _compile(model)
    frozen_before = flat(hidden.weights)
    one_step(model, x, y)
    np.testing.assert_array_equal(flat(hidden.weights), frozen_before)
    key = model.noise_key.numpy()
    assert int(model.dp_steps.numpy()) == 1

    hidden.trainable = True
    _compile(model)
    assert len(model._secret.accumulators) == len(model.trainable_variables) == 4
    assert [tuple(s.shape) for s in model.ema_variables] == [
        tuple(v.shape) for v in model.trainable_variables
    ]
    one_step(model, x, y)
    assert not np.allclose(flat(hidden.weights), frozen_before)  # it trains now
    assert int(model.dp_steps.numpy()) == 2  # the ledger went on
    np.testing.assert_array_equal(model.noise_key.numpy(), key)  # step 2 draws new noise


def test_freezing_and_recompiling_stops_training_that_layer():
    model, hidden = _model()
    x, y = _data()
    _compile(model)
    one_step(model, x, y)
    hidden.trainable = False
    _compile(model)
    assert len(model._secret.accumulators) == 2
    before = flat(hidden.weights)
    one_step(model, x, y)
    np.testing.assert_array_equal(flat(hidden.weights), before)
    assert int(model.dp_steps.numpy()) == 2


def test_a_built_optimizer_is_refused_after_the_trainable_set_changed():
    model, hidden = _model()
    x, y = _data()
    optimizer = keras.optimizers.SGD(0.5)
    model.compile(optimizer=optimizer, loss=LOSS)
    one_step(model, x, y)
    hidden.trainable = False
    with pytest.raises(ValueError, match="Invalid value for `optimizer`: expected a new"):
        model.compile(optimizer=optimizer, loss=LOSS)
    # Power check: the same optimizer is fine while the same variables train.
    hidden.trainable = True
    model.compile(optimizer=optimizer, loss=LOSS)


def test_frozen_weights_are_their_own_average():
    # A frozen layer loaded after the model was built (a pretrained backbone)
    # keeps its loaded weights under ema_weights(); the trained layer's
    # shadow is a real average.
    model, hidden = _model(ema_decay=0.9)
    hidden.trainable = False
    loaded = [np.full(w.shape, 0.25, np.float32) for w in hidden.get_weights()]
    hidden.set_weights(loaded)
    _compile(model)
    x, y = _data()
    one_step(model, x, y)
    with model.ema_weights():
        np.testing.assert_array_equal(flat(hidden.weights), flat(loaded))
        trained_ema = flat(model.layers[2].weights)
    np.testing.assert_array_equal(flat(hidden.weights), flat(loaded))
    assert not np.allclose(trained_ema, flat(model.layers[2].weights))


def test_weights_loaded_into_a_frozen_layer_after_compile_are_kept_by_ema_weights():
    model, hidden = _model(ema_decay=0.9)
    hidden.trainable = False
    _compile(model)
    x, y = _data()
    one_step(model, x, y)
    loaded = [np.full(w.shape, -0.5, np.float32) for w in hidden.get_weights()]
    hidden.set_weights(loaded)  # e.g. a backbone restored after compile
    with model.ema_weights():
        np.testing.assert_array_equal(flat(hidden.weights), flat(loaded))
