"""Review round 6 (JAX): callbacks that see or set weights the ledger must count.

- A `LambdaCallback` keeps its hooks on the instance: a snapshot taken in its
  `on_train_batch_end`, or a warm start set in its `on_train_batch_begin`,
  went uncounted (the check read the class). Counted now, like a subclass.
- Keras's optimizer EMA (`use_ema=True`), swapped in by `SwapEMAWeights`:
  a callback copying the swapped-in average at an epoch's end took weights
  the ledger never saw. Refused; `ema_decay` is the counted average.
"""

import keras
import numpy as np
import pytest

import tan_keras
from tan_keras.jax_dp import weights_recall

ROWS, BATCH = 64, 8


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(ROWS, 4)).astype("float32"), rng.normal(size=(ROWS, 1)).astype(
        "float32"
    )


def _model():
    return keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, activation="tanh"), keras.layers.Dense(1)]
    )


def _private(model, optimizer=None):
    dp_model = tan_keras.make_private(
        model, l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=BATCH, dataset_size=ROWS
    )
    dp_model.compile(optimizer or keras.optimizers.SGD(0.5), "mse")
    return dp_model


def _class_hooks_only(callback):
    # The check as it was: the class's hooks, not the instance's.
    return any(
        getattr(type(callback), hook, None) is not getattr(keras.callbacks.Callback, hook)
        for hook in weights_recall._BATCH_HOOKS
    )


@pytest.mark.parametrize("power_check", [False, True])
def test_a_lambda_callback_s_mid_epoch_snapshot_brings_its_updates(monkeypatch, power_check):
    if power_check:
        monkeypatch.setattr(weights_recall, "has_batch_hook", _class_hooks_only)
    x, y = _data()
    source = _private(_model())
    snapshots = []

    def snapshot(batch, logs):
        if batch == 3:
            snapshots.append([np.array(w) for w in callback.model.get_weights()])

    callback = keras.callbacks.LambdaCallback(on_train_batch_end=snapshot)
    source.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    copy = _model()
    copy.set_weights(snapshots[0])
    counted = int(_private(copy).dp_steps)
    if power_check:
        assert counted == 0
    else:
        assert counted == 4  # the updates of batches 0 to 3


@pytest.mark.parametrize("power_check", [False, True])
def test_a_lambda_callback_s_warm_start_mid_fit_is_counted(monkeypatch, power_check):
    if power_check:
        monkeypatch.setattr(weights_recall, "has_batch_hook", _class_hooks_only)
    x, y = _data()
    source = _private(_model())
    source.fit(x, y, epochs=1, verbose=0)
    source_weights = source.get_weights()
    target = _private(_model())
    callback = keras.callbacks.LambdaCallback(
        on_train_batch_begin=lambda batch, logs: (
            callback.model.set_weights(source_weights) if batch == 2 else None
        )
    )
    target.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    if power_check:
        assert int(target.dp_steps) == int(source.dp_steps)
    else:
        # The source's 8 updates and at least this fit's 6 after the warm start.
        assert int(target.dp_steps) >= 8 + 6


def test_an_optimizer_keeping_its_own_weight_average_is_refused():
    x, y = _data()
    with pytest.raises(ValueError, match=r"`optimizer`.*use_ema=False.*ema_decay"):
        _private(_model(), keras.optimizers.SGD(0.5, use_ema=True))
    dp_model = _private(_model())
    dp_model.optimizer.use_ema = True  # set after compile: refused at fit
    with pytest.raises(ValueError, match=r"`optimizer`.*use_ema=True"):
        dp_model.fit(x, y, epochs=1, verbose=0)


def test_the_model_s_own_average_trains_and_is_counted():
    x, y = _data()
    dp_model = tan_keras.make_private(
        _model(),
        l2_norm_clip=1.0,
        noise_multiplier=1.0,
        expected_batch_size=BATCH,
        dataset_size=ROWS,
        ema_decay=0.9,
    )
    dp_model.compile(keras.optimizers.SGD(0.5), "mse")
    dp_model.fit(x, y, epochs=1, verbose=0)
    with dp_model.ema_weights():
        average = [np.array(v) for v in dp_model.trainable_variables]
    copy = _model()
    copy.set_weights(average)
    assert int(_private(copy).dp_steps) == int(dp_model.dp_steps) > 0
