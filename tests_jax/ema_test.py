"""The EMA of the weights on the JAX backend: the released weights' average, saved, swapped in."""

import _jax_helpers as helpers
import keras
import numpy as np
import pytest

ROWS, BATCH, DECAY = 32, 8, 0.9


class _Released(keras.callbacks.Callback):
    """The trainable weights after each update (Keras syncs the JAX state for a callback)."""

    def __init__(self):
        super().__init__()
        self.weights = []

    def on_train_begin(self, logs=None):
        self.weights.append([np.array(v.value) for v in self.model.trainable_variables])

    def on_train_batch_end(self, batch, logs=None):
        self.weights.append([np.array(v.value) for v in self.model.trainable_variables])


def _expected_ema(released, decay, warm_up=True):
    ema = [w.copy() for w in released[0]]
    for t, weights in enumerate(released[1:]):
        rate = min(decay, (1 + t) / (10 + t)) if warm_up else decay
        ema = [rate * e + (1 - rate) * w for e, w in zip(ema, weights)]
    return ema


@pytest.mark.parametrize("warm_up", [True, False])
def test_the_ema_is_the_warmed_up_average_of_the_released_weights(warm_up):
    # warm_up=False compares with an average without the warm-up: the power
    # check that the comparison tells the two apart.
    dp_model = helpers.private(
        helpers.dense_model(), ROWS, batch=BATCH, lr=0.5, noise_multiplier=1.0, ema_decay=DECAY
    )
    x, y = helpers.data(ROWS)
    released = _Released()
    dp_model.fit(x, y, epochs=2, verbose=0, callbacks=[released])
    assert len(released.weights) == 1 + 2 * (ROWS // BATCH)
    expected = _expected_ema(released.weights, DECAY, warm_up)
    got = [np.array(v.value) for v in dp_model.ema_variables]
    close = all(np.allclose(g, e, rtol=1e-5, atol=1e-6) for g, e in zip(got, expected))
    assert close == warm_up


def test_ema_weights_are_swapped_in_and_back_and_saved(tmp_path):
    dp_model = helpers.private(
        helpers.dense_model(), ROWS, batch=BATCH, lr=0.5, noise_multiplier=1.0, ema_decay=DECAY
    )
    x, y = helpers.data(ROWS)
    dp_model.fit(x, y, epochs=1, verbose=0)
    weights = [np.array(v.value) for v in dp_model.trainable_variables]
    shadows = [np.array(v.value) for v in dp_model.ema_variables]
    assert not all(np.array_equal(w, s) for w, s in zip(weights, shadows))
    with dp_model.ema_weights():
        inside = [np.array(v.value) for v in dp_model.trainable_variables]
    for a, b in zip(inside, shadows):
        np.testing.assert_array_equal(a, b)
    for v, w in zip(dp_model.trainable_variables, weights):
        np.testing.assert_array_equal(np.array(v.value), w)
    dp_model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.ema_decay == DECAY
    for a, b in zip(loaded.ema_variables, shadows):
        np.testing.assert_array_equal(np.array(a.value), b)


def test_the_ema_weights_evaluate_after_a_fit_and_a_save(tmp_path):
    # Keras's evaluate donates its state's buffers: the weights swapped in
    # must not be the shadows' own buffers (XLA refused to donate one twice).
    dp_model = helpers.private(
        helpers.dense_model(), ROWS, batch=BATCH, lr=0.5, noise_multiplier=1.0, ema_decay=DECAY
    )
    x, y = helpers.data(ROWS)
    dp_model.compile(keras.optimizers.SGD(0.5), helpers.LOSS, metrics=["accuracy"])
    dp_model.fit(x, y, epochs=1, verbose=0)
    dp_model.save(tmp_path / "m.keras")
    plain = dp_model.evaluate(x, y, verbose=0, return_dict=True)
    with dp_model.ema_weights():
        averaged = dp_model.evaluate(x, y, verbose=0, return_dict=True)
    copy = helpers.dense_model()
    copy.set_weights([np.array(v.value) for v in dp_model.ema_variables])
    copy.compile(loss=helpers.LOSS, metrics=["accuracy"])
    expected = copy.evaluate(x, y, verbose=0, return_dict=True)
    assert averaged["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert plain["loss"] != pytest.approx(averaged["loss"], rel=1e-5)


def test_without_ema_decay_there_is_no_ema():
    dp_model = helpers.private(helpers.dense_model(), ROWS, batch=BATCH)
    assert dp_model.ema_variables is None
    with pytest.raises(ValueError, match="ema_decay"):
        with dp_model.ema_weights():
            pass
    with pytest.raises(ValueError, match="ema_decay"):
        helpers.private(helpers.dense_model(), ROWS, batch=BATCH, ema_decay=1.0)
