"""The warning for settings measured to train to chance: adaptive optimizers under noise."""

import warnings

import keras
import pytest

import tan_keras
from tan_keras.keras_dp import regime


def _private(noise_multiplier=1.0, kind="conv"):
    if kind == "conv":
        inputs = keras.Input((4, 4, 1))
        hidden = keras.layers.Flatten()(keras.layers.Conv2D(2, 3)(inputs))
    elif kind == "embedding":
        inputs = keras.Input((4,), dtype="int32")
        hidden = keras.layers.Flatten()(keras.layers.Embedding(10, 2)(inputs))
    else:
        inputs = hidden = keras.Input((4,))
    base = keras.Model(inputs, keras.layers.Dense(2)(hidden))
    return tan_keras.make_private(
        base,
        l2_norm_clip=1.0,
        noise_multiplier=noise_multiplier,
        expected_batch_size=8,
        dataset_size=64,
    )


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop", keras.optimizers.AdamW(1e-3)])
def test_an_adaptive_optimizer_on_convolutions_under_noise_warns_with_what_to_use(optimizer):
    model = _private()
    with pytest.warns(regime.TrainingRegimeWarning) as caught:
        model.compile(optimizer=optimizer, loss="mse")
    message = str(caught[0].message)
    assert "adaptive optimizer" in message and "convolutions" in message
    assert regime.RECOMMENDED in message
    assert caught[0].filename == __file__  # points at the user's compile


def test_sgd_on_a_trainable_embedding_under_noise_warns_to_use_adam():
    model = _private(kind="embedding")
    with pytest.warns(regime.TrainingRegimeWarning, match="Embedding.*Adam"):
        model.compile(optimizer="sgd", loss="mse")


@pytest.mark.parametrize(
    "optimizer, noise_multiplier, kind",
    [
        (keras.optimizers.SGD(0.25, momentum=0.9), 1.0, "conv"),
        ("adam", 0.0, "conv"),
        ("adam", 1.0, "embedding"),
        ("adam", 1.0, "dense"),
        ("sgd", 1.0, "dense"),
    ],
)
def test_settings_measured_to_train_are_not_warned_about(optimizer, noise_multiplier, kind):
    model = _private(noise_multiplier, kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error", regime.TrainingRegimeWarning)
        model.compile(optimizer=optimizer, loss="mse")


def test_every_keras_optimizer_is_classified():
    """Power check: a new Keras optimizer must be put on one side or the other."""
    # Wrappers are looked into (adaptive_part); Muon orthogonalizes whole
    # matrices and scales no coordinate by itself.
    plain = {"SGD", "Optimizer", "LossScaleOptimizer", "MultiOptimizer", "Muon"}
    names = {
        name
        for name in dir(keras.optimizers)
        if isinstance(getattr(keras.optimizers, name), type)
        and issubclass(getattr(keras.optimizers, name), keras.optimizers.Optimizer)
    }
    adaptive = {cls.__name__ for cls in regime._ADAPTIVE}
    assert "Adam" in adaptive and "SGD" not in adaptive
    assert names - adaptive - plain == set()


def test_a_wrapper_holding_an_adaptive_optimizer_is_seen_through():
    mapping = keras.optimizers.OptimizerMap(keras.optimizers.SGD(), {"d": keras.optimizers.Adam()})
    held = keras.optimizers.MultiOptimizer(mapping)
    assert type(regime.adaptive_part(held)).__name__ == "Adam"
    assert regime.adaptive_part(keras.optimizers.SGD()) is None
