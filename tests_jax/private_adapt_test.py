"""`private_adapt` on the JAX backend: the tutorial habit's private path, without TensorFlow.

A `Normalization` adapted with noise trains (the refusal of adapted state lets
it pass), and its release is composed into the private model's epsilon: the
model's epsilon is above its training's alone (the power check), and equals
the composition of both. Adapted again without noise, the layer is refused.
"""

import _jax_helpers as helpers
import keras
import pytest

import tan_keras
from tan_keras.mechanism import data_copies
from tan_keras.privacy import releases

N, DELTA, SIGMA = 32, 1e-5, 2.0


@pytest.fixture(autouse=True)
def _no_registered_rows():
    data_copies.forget()
    yield
    data_copies.forget()


def _model(norm):
    inp = keras.Input((6,))
    return keras.Model(inp, keras.layers.Dense(3)(norm(inp)))


def test_a_privately_adapted_normalization_trains_and_its_release_is_in_the_epsilon():
    x, y = helpers.data(N)
    norm = keras.layers.Normalization()
    statistics = tan_keras.private_adapt(norm, x, lower=-5.0, upper=5.0, noise_multiplier=SIGMA)
    assert statistics.count == N
    dp_model = helpers.private(_model(norm), N, batch=8, noise_multiplier=1.0)
    helpers.update(dp_model, x, y)
    assert int(dp_model.dp_steps) > 0
    entries = dp_model.privacy_ledger.entries()
    gaussian = [e for e in entries if e.mechanism.kind == "gaussian"]
    training = [e for e in entries if e.mechanism.kind == "poisson"]
    assert gaussian and gaussian[0].mechanism == releases.Mechanism("gaussian", SIGMA)
    epsilon = dp_model.privacy_ledger.epsilon(DELTA)
    assert epsilon == pytest.approx(releases.composed_epsilon(entries, DELTA))
    assert epsilon > releases.composed_epsilon(training, DELTA) + 0.1


def test_adapted_again_without_noise_it_is_refused():
    x, y = helpers.data(N)
    norm = keras.layers.Normalization()
    tan_keras.private_adapt(norm, x, lower=-5.0, upper=5.0, noise_multiplier=SIGMA)
    dp_model = helpers.private(_model(norm), N, batch=8)
    norm.adapt(x)
    with pytest.raises(ValueError, match="changed since it was privately adapted"):
        dp_model.fit(x, y, epochs=1, verbose=0)
    assert int(dp_model.dp_steps) == 0
