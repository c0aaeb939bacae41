"""Review round 6: an optimizer keeping its own moving average of the weights.

Keras's `use_ema=True` keeps the average in optimizer variables that
`keras.callbacks.SwapEMAWeights` swaps into the model and that the end of
`fit` writes over the weights, values the ledger never saw (a review copied
the swapped-in average of 8 noisy updates at an epoch's end: counted 0).
Refused at `compile` and at `fit`; `ema_decay` is the counted average.
"""

import keras
import numpy as np
import pytest

import tan_keras

ROWS, BATCH = 32, 8


def _private(optimizer, **dp):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    dp_model = tan_keras.make_private(
        model,
        l2_norm_clip=1.0,
        noise_multiplier=1.0,
        expected_batch_size=BATCH,
        dataset_size=ROWS,
        **dp,
    )
    dp_model.compile(optimizer, "mse")
    return dp_model


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(ROWS, 4)).astype("float32"), rng.normal(size=(ROWS, 1)).astype(
        "float32"
    )


def test_use_ema_is_refused_at_compile_naming_the_model_s_own_average():
    with pytest.raises(ValueError, match=r"`optimizer`.*use_ema=False.*ema_decay"):
        _private(keras.optimizers.Adam(1e-3, use_ema=True))


def test_use_ema_set_after_compile_is_refused_at_fit():
    dp_model = _private(keras.optimizers.SGD(0.5))
    dp_model.optimizer.use_ema = True
    x, y = _data()
    with pytest.raises(ValueError, match=r"`optimizer`.*use_ema=True"):
        dp_model.fit(x, y, epochs=1, verbose=0)
    assert int(dp_model.dp_steps) == 0


def test_power_check_the_model_s_own_average_trains():
    dp_model = _private(keras.optimizers.SGD(0.5), ema_decay=0.9)
    x, y = _data()
    dp_model.fit(x, y, epochs=1, verbose=0)
    assert int(dp_model.dp_steps) > 0
