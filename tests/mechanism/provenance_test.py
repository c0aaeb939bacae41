"""Preprocessing state adapted on the private data is refused unless vouched for.

Attack: the Keras tutorial habit `norm = Normalization(); norm.adapt(x_train)`
ships the training set's mean and variance inside the model, without noise:
a release no epsilon covers. A private model refuses such a layer when it is
built and at every fit (the layer may be adapted after `make_private`);
`mark_public` and `private_adapt` vouch for the layer's current state, and
the vouching survives `model.save` / `load_model`. Power checks: a layer
never adapted, or given its statistics, is accepted; a mark dropped from the
saved config makes the reloaded model refuse.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from _helpers import LOSS, flat

import tan_keras
from tan_keras.mechanism import provenance, sampling

N, B = 64, 16
DP = dict(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=B, dataset_size=N)


def _data():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(N, 3)) * [1.0, 2.0, 3.0] + [5.0, -1.0, 0.0]).astype(np.float32)
    return x, rng.integers(0, 2, N).astype(np.int32)


def _model(preprocess, inputs=None):
    inp = inputs if inputs is not None else keras.Input((3,))
    h = preprocess(inp)
    if h.dtype != "float32":
        h = keras.layers.Flatten()(keras.layers.Embedding(20, 2)(h))
    return keras.Model(inp, keras.layers.Dense(2)(h))


def _train(private, steps=2):
    x, y = _data()
    private.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    sampler = sampling.PoissonSampler(N, B)
    private.fit(sampling.make_poisson_dataset(x, y, sampler), steps_per_epoch=steps, verbose=0)
    return private


def test_the_tutorial_habit_is_refused_with_the_three_ways_out():
    x, _ = _data()
    norm = keras.layers.Normalization(name="norm")
    norm.adapt(x)
    with pytest.raises(ValueError) as refusal:
        tan_keras.make_private(_model(norm), **DP)
    message = str(refusal.value)
    assert "`norm` (Normalization)" in message and "epsilon does not cover" in message
    for way_out in ("Normalization(mean=..., variance=...)", "mark_public", "private_adapt"):
        assert way_out in message


def test_untouched_or_given_statistics_are_accepted():
    # Power check of the refusal: it is about data-derived state only.
    _train(tan_keras.make_private(_model(keras.layers.Normalization()), **DP))
    given = keras.layers.Normalization(mean=[5.0, -1.0, 0.0], variance=[1.0, 4.0, 9.0])
    _train(tan_keras.make_private(_model(given), **DP))


def test_a_layer_adapted_after_make_private_is_refused_at_fit():
    x, _ = _data()
    norm = keras.layers.Normalization(name="late")
    private = tan_keras.make_private(_model(norm), **DP)
    norm.adapt(x)
    with pytest.raises(ValueError, match="`late` \\(Normalization\\) holds state computed"):
        _train(private)


def test_mark_public_lets_the_layer_through_until_it_is_adapted_again():
    x, _ = _data()
    norm = keras.layers.Normalization(name="norm")
    norm.adapt(x + 1.0)
    assert tan_keras.mark_public(norm, reason="adapted on a public sample") is norm
    private = _train(tan_keras.make_private(_model(norm), **DP))
    norm.adapt(x)  # the declaration covered the earlier state only
    with pytest.raises(ValueError, match="changed since it was declared public"):
        _train(private)


@pytest.mark.parametrize(
    "layer,data",
    [
        (lambda: keras.layers.Discretization(num_bins=4, name="bins"), "float"),
        (lambda: keras.layers.IntegerLookup(name="bins"), "int"),
    ],
)
def test_adapted_bins_and_vocabularies_are_refused(layer, data):
    rng = np.random.default_rng(1)
    values = rng.integers(0, 10, (N, 3))
    values = values.astype(np.float32 if data == "float" else np.int64)
    preprocess = layer()
    preprocess.adapt(values)
    inputs = keras.Input((3,), dtype="float32" if data == "float" else "int64")
    model = _model(preprocess, inputs)
    with pytest.raises(ValueError, match="`bins`.*(boundaries|vocabulary)"):
        tan_keras.make_private(model, **DP)
    tan_keras.mark_public(preprocess, "public bins")
    tan_keras.make_private(model, **DP)


def test_mark_public_validates_its_arguments():
    with pytest.raises(
        ValueError, match="Invalid value for `layer`: expected a Keras Normalization"
    ):
        tan_keras.mark_public(keras.layers.Dense(2), "reason")
    with pytest.raises(ValueError, match="Invalid value for `reason`: expected a non-empty"):
        tan_keras.mark_public(keras.layers.Normalization(), "  ")


def _reload(private, tmp_path):
    path = str(tmp_path / "private.keras")
    private.save(path)
    return keras.models.load_model(path)


def test_a_public_declaration_survives_save_and_load(tmp_path):
    x, _ = _data()
    norm = keras.layers.Normalization(name="norm")
    norm.adapt(x)
    tan_keras.mark_public(norm, "adapted on a public sample")
    private = _train(tan_keras.make_private(_model(norm), **DP))
    loaded = _reload(private, tmp_path)
    restored = provenance.mark_of(loaded.get_layer("norm"))
    assert restored.provenance == provenance.PUBLIC
    assert restored.reason == "adapted on a public sample"
    np.testing.assert_allclose(flat(loaded.get_weights()), flat(private.get_weights()))
    before = flat(loaded.trainable_variables)
    _train(loaded)
    assert not np.allclose(flat(loaded.trainable_variables), before)


def test_power_check_a_reload_without_the_marks_is_refused(tmp_path, monkeypatch):
    x, _ = _data()
    norm = keras.layers.Normalization(name="norm")
    norm.adapt(x)
    tan_keras.mark_public(norm, "adapted on a public sample")
    private = tan_keras.make_private(_model(norm), **DP)
    monkeypatch.setattr(provenance, "to_config", lambda model: {})
    loaded = _reload(private, tmp_path)
    with pytest.raises(ValueError, match="`norm` \\(Normalization\\) holds state"):
        _train(loaded)


def test_an_adapted_vocabulary_of_a_string_model_is_refused_unless_public():
    texts = tf.constant(["good film", "bad plot", "not good"])
    vectorizer = keras.layers.TextVectorization(output_sequence_length=4, name="adapted")
    vectorizer.adapt(texts)
    text = keras.Input((1,), dtype="string")
    model = _model(vectorizer, text)
    with pytest.raises(ValueError, match="`adapted` \\(TextVectorization\\).*vocabulary="):
        tan_keras.make_private(model, **DP)
    tan_keras.mark_public(vectorizer, "a public word list")
    tan_keras.make_private(model, **DP)
