"""Review round 9: keras.io's fine-tuning, a backbone unfrozen after make_private.

The model was analysed once, at construction, with the backbone frozen: its
BatchNormalization ran in inference mode. Unfrozen (`base.trainable = True`,
compile again), it wrote its moving statistics from each batch, and one
replaced example moved the update 258x the bound. The analysis is now keyed
by the layers' `trainable` flags and runs again at `compile` and `fit`.
"""

import keras
import numpy as np
import pytest

import tan_keras
from tan_keras.mechanism import model_analysis

ROWS = 32


def _frozen_backbone_model():
    keras.utils.set_random_seed(1)
    base = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8), keras.layers.BatchNormalization()],
        name="base",
    )
    base.trainable = False
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(2)(base(inputs, training=False))
    return base, keras.Model(inputs, outputs)


def _private(model):
    dp_model = tan_keras.make_private(
        model, l2_norm_clip=1.0, noise_multiplier=0.0, expected_batch_size=ROWS, dataset_size=ROWS
    )
    dp_model.compile(
        keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    return dp_model


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(ROWS, 4)).astype("float32"), rng.integers(0, 2, ROWS)


def test_unfreezing_then_compiling_again_is_refused():
    base, model = _frozen_backbone_model()
    dp_model = _private(model)
    x, y = _data()
    dp_model.fit(x, y, batch_size=ROWS, epochs=1, verbose=0)
    base.trainable = True
    with pytest.raises(ValueError, match=r"`batch_normalization.*training mode"):
        dp_model.compile(
            keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )


def test_unfreezing_without_compiling_again_is_refused_at_fit():
    base, model = _frozen_backbone_model()
    dp_model = _private(model)
    x, y = _data()
    base.trainable = True
    with pytest.raises(ValueError, match=r"training mode"):
        dp_model.fit(x, y, batch_size=ROWS, epochs=1, verbose=0)
    assert int(dp_model.dp_steps) == 0


def test_fine_tuning_with_the_norms_kept_frozen_trains():
    base, model = _frozen_backbone_model()
    dp_model = _private(model)
    x, y = _data()
    dp_model.fit(x, y, batch_size=ROWS, epochs=1, verbose=0)
    base.trainable = True
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False  # keras.io's way: the norms stay in inference mode
    moving = base.layers[1].moving_mean.numpy().copy()
    dp_model.compile(
        keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    dp_model.fit(x, y, batch_size=ROWS, epochs=1, verbose=0)
    assert int(dp_model.dp_steps) == 2
    np.testing.assert_array_equal(base.layers[1].moving_mean.numpy(), moving)


def test_power_check_an_analysis_kept_from_construction_lets_the_statistics_move(monkeypatch):
    monkeypatch.setattr(model_analysis, "_trainable_flags", lambda model: ())
    base, model = _frozen_backbone_model()
    dp_model = _private(model)
    x, y = _data()
    dp_model.fit(x, y, batch_size=ROWS, epochs=1, verbose=0)
    base.trainable = True
    moving = base.layers[1].moving_mean.numpy().copy()
    dp_model.compile(
        keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    dp_model.fit(x, y, batch_size=ROWS, epochs=1, verbose=0)
    assert np.abs(base.layers[1].moving_mean.numpy() - moving).max() > 1e-3
