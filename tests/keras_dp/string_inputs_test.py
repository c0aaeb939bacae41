"""String inputs mapped to numbers inside the model (TextVectorization & co).

The preprocessing runs once per micro-batch, the per-example routes run the
numeric rest: one DP step on raw texts must equal the step of the same model
fed the token ids directly, on every route that takes it.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from _helpers import flat, step_dataset

import tan_keras
from tan_keras.keras_dp.dp_model import DPKerasModel

VOCAB = ["good", "bad", "not", "film", "plot", "great"]
LENGTH = 6
B = 5
CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
DP = dict(l2_norm_clip=0.2, noise_multiplier=0.0, expected_batch_size=B, dataset_size=100)
TEXTS = np.array(
    [["good film"], ["not good not good plot"], ["bad bad bad"], ["great plot film"], ["unknown"]]
)


def _vectorizer():
    return keras.layers.TextVectorization(vocabulary=VOCAB, output_sequence_length=LENGTH)


def _head(ids, num, seed=0):
    keras.utils.set_random_seed(seed)
    h = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(len(VOCAB) + 2, 4)(ids))
    return keras.layers.Dense(2)(keras.layers.Concatenate()([h, num]))


def _string_model(**kwargs):
    text, num = keras.Input((1,), dtype="string", name="text"), keras.Input((2,), name="num")
    out = _head(_vectorizer()(text), num)
    return DPKerasModel({"text": text, "num": num}, out, **{**DP, **kwargs})


def _id_model(**kwargs):
    ids, num = keras.Input((LENGTH,), dtype="int64", name="ids"), keras.Input((2,), name="num")
    return DPKerasModel({"ids": ids, "num": num}, _head(ids, num), **{**DP, **kwargs})


def _step(model, x, y):
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=CE)
    model.fit(step_dataset(model, x, y), verbose=0)
    return flat(model.trainable_variables)


@pytest.mark.parametrize("views", [1, 2])
@pytest.mark.parametrize("clipping", ["vectorized", "ghost"])
def test_a_step_on_texts_equals_the_step_on_their_token_ids(clipping, views):
    rng = np.random.default_rng(0)
    texts = TEXTS if views == 1 else np.stack([TEXTS, TEXTS[::-1]], 1)
    num = rng.normal(size=(B, 2) if views == 1 else (B, views, 2)).astype(np.float32)
    y = np.array([0, 1, 1, 0, 1], np.int32)
    ids = _vectorizer()(texts.reshape(-1, 1)).numpy().reshape(texts.shape[:-1] + (LENGTH,))
    string_model = _string_model(clipping=clipping, augmult=views)
    id_model = _id_model(clipping=clipping, augmult=views)
    id_model.set_weights(string_model.get_weights())
    got = _step(string_model, {"text": texts, "num": num}, y)
    np.testing.assert_allclose(got, _step(id_model, {"ids": ids, "num": num}, y), atol=1e-6)
    # Power check: the texts matter (another text gives another step).
    other = _id_model(clipping=clipping, augmult=views)
    other.set_weights(string_model.get_weights())
    assert not np.allclose(got, _step(other, {"ids": np.roll(ids, 1, 0), "num": num}, y))


def test_a_text_model_trains_on_the_poisson_pipeline_and_evaluates_on_texts():
    n = 60
    rng = np.random.default_rng(1)
    words = np.array(VOCAB)
    texts = np.array([[" ".join(rng.choice(words, 4))] for _ in range(n)])
    labels = np.array([int("good" in t[0] or "great" in t[0]) for t in texts], np.int32)
    features = {"text": texts, "num": rng.normal(size=(n, 2)).astype(np.float32)}
    model = _string_model(expected_batch_size=20, dataset_size=n, noise_multiplier=0.3)
    model.compile(optimizer=keras.optimizers.SGD(2.0), loss=CE, metrics=["accuracy"])
    sampler = tan_keras.PoissonSampler(n, 20)
    model.fit(
        tan_keras.make_poisson_dataset(features, labels, sampler), steps_per_epoch=15, verbose=0
    )
    assert int(model.dp_steps.numpy()) == 15
    # Keras's array adapter takes strings as a tensor (not numpy's "<U" arrays).
    features["text"] = tf.constant(texts)
    result = model.evaluate(features, labels, verbose=0, return_dict=True)
    assert np.isfinite(result["loss"]) and 0.0 <= result["accuracy"] <= 1.0


def test_texts_padded_to_the_batch_are_refused():
    text = keras.Input((1,), dtype="string")
    ids = keras.layers.TextVectorization(vocabulary=VOCAB)(text)  # no output_sequence_length
    out = keras.layers.Dense(2)(
        keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(8, 4)(ids))
    )
    with pytest.raises(ValueError, match="no static shape.*output_sequence_length"):
        DPKerasModel(text, out, **DP)


def test_strings_reaching_another_layer_are_refused():
    text = keras.Input((1,), dtype="string")
    lengths = keras.layers.Lambda(
        lambda s: tf.cast(tf.strings.length(s), tf.float32), output_shape=(1,)
    )(text)
    with pytest.raises(ValueError, match="strings reach `.*` \\(Lambda\\).*TextVectorization"):
        DPKerasModel(text, keras.layers.Dense(2)(lengths), **DP)


def _text_only_model(vectorizer):
    text = keras.Input((1,), dtype="string")
    h = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(20, 4)(vectorizer(text)))
    return DPKerasModel(text, keras.layers.Dense(2)(h), **DP)


def test_an_adapted_vocabulary_is_refused_unless_declared_public():
    adapted = keras.layers.TextVectorization(output_sequence_length=LENGTH, name="adapted")
    adapted.adapt(tf.constant(TEXTS[:, 0]))
    with pytest.raises(ValueError, match="`adapted` \\(TextVectorization\\).*vocabulary="):
        _text_only_model(adapted)
    tan_keras.mark_public(adapted, "a public word list")
    _text_only_model(adapted)
    # Power check: a given vocabulary (and Hashing, which has none) is accepted as it is.
    for given in (_vectorizer(), keras.layers.Hashing(20)):
        _text_only_model(given)


def test_xla_is_turned_off_by_keras_for_a_string_model():
    # Keras runs TextVectorization outside XLA: it compiles the model without
    # it (with a warning), so "auto" takes the ghost route, not layerwise.
    model = _string_model()
    model.compile(optimizer="sgd", loss=CE, jit_compile=True)
    assert model.jit_compile is False and model.clipping == "ghost"


def test_a_string_model_saves_and_reloads_with_its_vocabulary(tmp_path):
    model = _string_model()
    model.compile(optimizer="sgd", loss=CE)
    path = str(tmp_path / "text.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    x = {"text": tf.constant(TEXTS), "num": np.ones((B, 2), np.float32)}
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    # The reloaded model is cut again: it trains on texts.
    y = np.array([0, 1, 1, 0, 1], np.int32)
    before = flat(loaded.trainable_variables)
    x = {"text": TEXTS, "num": np.ones((B, 2), np.float32)}
    loaded.fit(step_dataset(loaded, x, y), verbose=0)
    assert not np.allclose(flat(loaded.trainable_variables), before)
