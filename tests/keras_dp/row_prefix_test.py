"""Row-wise preprocessing at the head of the model runs once on the micro-batch.

Random augmentation layers without weights (and string preprocessing, see
string_inputs_test.py) run on the batch * K rows before the per-example
gradients. Privacy holds only if each row's output depends on its own row
alone: every accepted layer is tested for it (with a power check: MixUp
fails the same test). Utility needs each row to draw its own augmentation:
inside the per-example computation all examples of a batch shared one
transform (power check below); on the batch each row draws its own.
"""

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf
from _helpers import flat, step_dataset

import tan_keras
from tan_keras.keras_dp import row_prefix

SHAPE = (12, 12, 3)
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

ACCEPTED = {
    "RandomFlip": lambda seed: keras.layers.RandomFlip(seed=seed),
    "RandomRotation": lambda seed: keras.layers.RandomRotation(0.2, seed=seed),
    "RandomZoom": lambda seed: keras.layers.RandomZoom(0.2, seed=seed),
    "RandomTranslation": lambda seed: keras.layers.RandomTranslation(0.2, 0.2, seed=seed),
    "RandomContrast": lambda seed: keras.layers.RandomContrast(0.5, seed=seed),
    "RandomBrightness": lambda seed: keras.layers.RandomBrightness(0.5, seed=seed),
    "Rescaling": lambda seed: keras.layers.Rescaling(1 / 255.0),
    "Resizing": lambda seed: keras.layers.Resizing(8, 8),
    "CenterCrop": lambda seed: keras.layers.CenterCrop(8, 8),
}
RANDOM = {"RandomFlip", "RandomRotation", "RandomZoom", "RandomTranslation"}
RANDOM |= {"RandomContrast", "RandomBrightness"}


def _images(rows, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (rows, *SHAPE)).astype(np.float32)


def _rows_alone(make_layer) -> bool:
    """Whether changing one input row leaves every other output row as it was."""
    images = _images(6)
    changed = images.copy()
    changed[2] = 255.0 - changed[2]
    first = make_layer(11)(images, training=True).numpy()
    second = make_layer(11)(changed, training=True).numpy()
    others = [i for i in range(len(images)) if i != 2]
    return np.array_equal(first[others], second[others])


def _distinct_draws(make_layer) -> int:
    """How many different outputs 12 identical input rows come out as."""
    same = np.repeat(_images(1), 12, axis=0)
    out = make_layer(5)(same, training=True).numpy()
    return len({row.tobytes() for row in out})


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_every_accepted_layer_maps_each_row_by_itself(name):
    layer = ACCEPTED[name](0)
    assert isinstance(
        layer, row_prefix._RANDOM_AUGMENTATIONS + row_prefix._DETERMINISTIC_ROW_LAYERS
    )
    assert not layer.weights
    assert _rows_alone(ACCEPTED[name])
    if name == "RandomFlip":  # four outcomes: one draw per batch would give 1
        assert _distinct_draws(ACCEPTED[name]) > 1
    elif name in RANDOM:
        assert _distinct_draws(ACCEPTED[name]) == 12


def test_the_row_tests_catch_mixing_and_shared_draws():
    # Power checks: a layer that blends rows fails the first test, a layer
    # with one draw per batch the second; neither is accepted in the prefix.
    assert not _rows_alone(lambda seed: keras.layers.MixUp(seed=seed))
    assert _distinct_draws(lambda seed: keras.layers.RandomCrop(8, 8, seed=seed)) == 1
    for rejected in (keras.layers.MixUp(), keras.layers.RandomCrop(8, 8)):
        assert not row_prefix._row_wise(rejected, False)


def _augmented_model(clipping="auto", seed=0, augmentation=None):
    keras.utils.set_random_seed(seed)
    augmentation = augmentation or keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=1),
            keras.layers.RandomRotation(0.2, seed=2),
            keras.layers.RandomZoom(0.2, seed=3),
        ]
    )
    inp = keras.Input(SHAPE)
    x = keras.layers.Rescaling(1 / 255.0)(augmentation(inp))
    x = keras.layers.Conv2D(4, 3, strides=2, activation="tanh")(x)
    out = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x))
    model = tan_keras.make_private(
        keras.Model(inp, out),
        l2_norm_clip=0.5,
        noise_multiplier=0.0,
        expected_batch_size=8,
        dataset_size=64,
        augmult=2,
        clipping=clipping,
    )
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss=LOSS)
    return model


def _suffix_rows(model, images):
    views = np.repeat(images[:, None], 2, axis=1)
    _, x, _, _ = model._per_example_inputs(tf.constant(views), tf.ones(len(images)))
    return tf.reshape(x[0], [-1, *x[0].shape[2:]]).numpy()


def test_augmentation_runs_on_the_batch_and_each_view_draws_its_own():
    model = _augmented_model()
    assert model._row_prefix is not None
    suffix_layers = {type(layer) for layer in model._row_prefix.suffix.layers}
    assert not suffix_layers & set(row_prefix._RANDOM_AUGMENTATIONS + (keras.Sequential,))
    rows = _suffix_rows(model, np.repeat(_images(1), 4, axis=0))  # 4 examples x 2 views
    distinct = {rows[i].tobytes() for i in range(len(rows))}
    assert len(distinct) == len(rows)
    # Power check: the same layers inside the per-example computation give
    # every example of the batch the same transform.
    augmentation = keras.Sequential([keras.layers.RandomRotation(0.2, seed=2)])
    alone = tf.vectorized_map(
        lambda image: augmentation(image[None], training=True)[0],
        tf.constant(np.repeat(_images(1), 4, axis=0)),
    ).numpy()
    assert len({alone[i].tobytes() for i in range(len(alone))}) == 1


def _while_loop_messages(caplog, model):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tensorflow"):
        model.fit(_images(64), np.arange(64) % 3, batch_size=8, epochs=1, verbose=0)
    return [r for r in caplog.records if "while_loop" in r.getMessage()]


def test_no_while_loop_fallback_message_during_fit(caplog, monkeypatch):
    assert not _while_loop_messages(caplog, _augmented_model(clipping="vectorized"))
    # Power check: inside the per-example computation the image transform
    # falls back to a loop, and TensorFlow says so.
    monkeypatch.setattr(row_prefix, "split", lambda model: None)
    assert _while_loop_messages(caplog, _augmented_model(clipping="vectorized"))


@pytest.mark.parametrize("clipping", ["ghost", "vectorized"])
def test_one_example_moves_the_noiseless_update_by_at_most_lr_c_over_b(clipping):
    # Same seeds, so both runs draw the same augmentation for each row; only
    # row 3 differs (a huge image in place of an ordinary one).
    images, labels = np.repeat(_images(8)[:, None], 2, axis=1), np.arange(8) % 3  # K = 2
    neighbour = images.copy()
    neighbour[3] = 1e4
    updates = []
    for data in (images, neighbour):
        model = _augmented_model(clipping)
        before = flat(model.get_weights())
        model.fit(step_dataset(model, data, labels), epochs=1, verbose=0)
        updates.append(flat(model.get_weights()) - before)
    # A replaced example: at most twice lr * C / B (lr 1, C 0.5, B 8).
    moved = np.linalg.norm(updates[0] - updates[1])
    assert 0.02 < moved <= 2 * 1.0 * 0.5 / 8 * (1 + 1e-5)


def _private(inp, out):
    return tan_keras.make_private(
        keras.Model(inp, out),
        l2_norm_clip=1.0,
        noise_multiplier=1.0,
        expected_batch_size=8,
        dataset_size=64,
    )


def test_only_random_augmentation_at_the_head_is_cut():
    inp = keras.Input(SHAPE)
    x = keras.layers.Rescaling(1 / 255.0)(inp)  # deterministic alone: nothing to gain
    out = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x))
    plain = _private(inp, out)
    assert plain._row_prefix is None
    # A layer called at the head and again later stays in the model.
    flip = keras.layers.RandomFlip(seed=1)
    inp = keras.Input(SHAPE)
    h = keras.layers.Conv2D(3, 3, padding="same")(flip(inp))
    out = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(flip(h)))
    model = _private(inp, out)
    assert model._row_prefix is None
    model.compile(optimizer="sgd", loss=LOSS)
    model.fit(_images(64), np.arange(64) % 3, batch_size=8, epochs=1, verbose=0)


def _structured_model():
    """keras.io's structured-data habit: an IntegerLookup on an integer feature."""
    keras.utils.set_random_seed(0)
    code = keras.Input((1,), dtype="int64", name="code")
    age = keras.Input((1,), name="age")
    lookup = keras.layers.IntegerLookup(vocabulary=[3, 5, 7], output_mode="one_hot")
    h = keras.layers.Concatenate()([lookup(code), age])
    out = keras.layers.Dense(2)(keras.layers.Dense(4, activation="tanh")(h))
    model = tan_keras.make_private(
        keras.Model([code, age], out),
        l2_norm_clip=1.0,
        noise_multiplier=0.0,
        expected_batch_size=8,
        dataset_size=64,
        clipping="vectorized",
    )
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=LOSS)
    return model


def _structured_fit(caplog, model):
    rng = np.random.default_rng(0)
    x = [rng.choice([3, 5, 7, 9], size=(64, 1)), rng.normal(size=(64, 1)).astype(np.float32)]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tensorflow"):
        model.fit(x, np.arange(64) % 2, batch_size=8, epochs=1, verbose=0)
    return [r for r in caplog.records if "LookupTableFind" in r.getMessage()]


def test_integer_lookups_run_on_the_batch(caplog, monkeypatch):
    model = _structured_model()
    assert model._row_prefix is not None
    assert model._row_prefix.direct_inputs == [model.inputs[1]]
    assert not _structured_fit(caplog, model)
    # Power check: inside the per-example computation the lookup loops.
    monkeypatch.setattr(row_prefix, "split", lambda model: None)
    assert _structured_fit(caplog, _structured_model())


def test_image_layers_need_batches_of_images():
    # Grayscale [rows, H, W] is one image to Keras: never run on the batch.
    for rank in (2, 3, 5):
        assert not row_prefix._row_wise(keras.layers.RandomContrast(0.2), False, rank)
        assert not row_prefix._row_wise(keras.Sequential([keras.layers.RandomFlip()]), False, rank)
    assert row_prefix._row_wise(keras.layers.RandomContrast(0.2), False, 4)
    assert row_prefix._row_wise(keras.layers.IntegerLookup(vocabulary=[1]), False, 2)
