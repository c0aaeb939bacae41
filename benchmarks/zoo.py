"""The benchmark zoo: the models users bring, built the same on either Keras backend.

The trainable parts of the six keras.io-style workflows in `examples/`
(image classification with augmentation layers, structured data, a
subclassed model, text with Conv1D and with a Transformer block, time
series, transfer learning on a frozen MobileNetV2), and a small CNN with
strided convolutions and a dense head. Preprocessing that needs the data
(`Normalization.adapt`, lookups, `TextVectorization`) is left out: the
inputs are what those layers would give (features, token ids). Every head
gives 10 logits, so one loss times them all.

`benchmarks/dp_step_benchmark.py` (TensorFlow) and
`benchmarks/jax_step_benchmark.py` (JAX) take `--models=zoo`.
"""

from typing import Callable, NamedTuple, Tuple

import keras
import numpy as np

CLASSES = 10
# The examples' sizes (examples/text_keras.py: 47 words + 2, 12 tokens).
_TEXT_VOCABULARY, _TEXT_LENGTH, _TEXT_DIM = 49, 12, 32
_STRUCTURED_FEATURES = 29  # 5 normalized numbers and 24 one-hot categories
_SERIES_LENGTH = 128


class ZooModel(NamedTuple):
    """A zoo entry.

    Attributes:
      build: () -> an unbuilt-weights Keras model with 10 logits.
      example_shape: One example's input shape.
      dtype: The input dtype ("float32", or "int32" for token ids).
      high: Inputs are drawn below this (the vocabulary, for ids).
      subclassed: `make_private` needs the example shape (`private_kwargs`).
    """

    build: Callable[[], keras.Model]
    example_shape: Tuple[int, ...]
    dtype: str = "float32"
    high: float = 1.0
    subclassed: bool = False


def _image_augmentation():
    inputs = keras.Input((32, 32, 3))
    augment = keras.Sequential(
        [keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.1)]
    )
    x = keras.layers.Rescaling(1.0 / 255)(augment(inputs))
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(64, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.Dropout(0.25)(keras.layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, keras.layers.Dense(CLASSES)(x))


def _structured_data():
    inputs = keras.Input((_STRUCTURED_FEATURES,))
    x = keras.layers.Dense(32, activation="relu")(inputs)
    x = keras.layers.Dropout(0.5)(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES)(x))


class SubclassedClassifier(keras.Model):
    """examples/subclassed_callbacks_keras.py's model."""

    def __init__(self):
        super().__init__()
        self.rescale = keras.layers.Rescaling(1.0 / 255)
        self.conv1 = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")
        self.conv2 = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.classifier = keras.layers.Dense(CLASSES)

    def call(self, inputs):
        return self.classifier(self.pool(self.conv2(self.conv1(self.rescale(inputs)))))


def _subclassed():
    return SubclassedClassifier()  # (unbuilt: make_private takes its input_shape)


def _text(kind):
    inputs = keras.Input((_TEXT_LENGTH,), dtype="int32")
    x = keras.layers.Embedding(_TEXT_VOCABULARY, _TEXT_DIM)(inputs)
    if kind == "conv1d":
        x = keras.layers.Conv1D(64, 3, padding="valid", activation="relu")(x)
        x = keras.layers.GlobalMaxPooling1D()(x)
    else:
        attention = keras.layers.MultiHeadAttention(num_heads=2, key_dim=_TEXT_DIM)(x, x)
        x = keras.layers.LayerNormalization(epsilon=1e-6)(x + attention)
        hidden = keras.layers.Dense(_TEXT_DIM, activation="relu")(x)
        x = keras.layers.LayerNormalization(epsilon=1e-6)(x + keras.layers.Dense(_TEXT_DIM)(hidden))
        x = keras.layers.GlobalAveragePooling1D()(x)
    x = keras.layers.Dense(32, activation="relu")(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES)(x))


def _time_series():
    inputs = keras.Input((_SERIES_LENGTH, 1))
    x = keras.layers.Conv1D(32, 5, padding="same", activation="relu")(inputs)
    x = keras.layers.MaxPooling1D(4)(x)
    x = keras.layers.Conv1D(32, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling1D(2)(x)
    # (unroll=True, as examples/time_series_private.py: the TensorFlow route
    # refuses a recurrent loop it cannot vectorize; 16 steps here.)
    x = keras.layers.GRU(32, unroll=True)(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES)(x))


def _transfer_learning():
    base = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, include_top=False, weights=None
    )
    base.trainable = False
    inputs = keras.Input((32, 32, 3))
    x = base(keras.layers.Rescaling(1.0 / 127.5, offset=-1)(inputs), training=False)
    x = keras.layers.Dropout(0.2)(keras.layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, keras.layers.Dense(CLASSES)(x))


def _strided_cnn():
    return keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(32, 3, strides=2, activation="relu"),
            keras.layers.Conv2D(64, 3, strides=2, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(CLASSES),
        ]
    )


ZOO = {
    "image_augmentation": ZooModel(_image_augmentation, (32, 32, 3), high=255.0),
    "structured_data": ZooModel(_structured_data, (_STRUCTURED_FEATURES,)),
    "subclassed": ZooModel(_subclassed, (32, 32, 3), high=255.0, subclassed=True),
    "text_conv1d": ZooModel(lambda: _text("conv1d"), (_TEXT_LENGTH,), "int32", _TEXT_VOCABULARY),
    "text_transformer": ZooModel(
        lambda: _text("transformer"), (_TEXT_LENGTH,), "int32", _TEXT_VOCABULARY
    ),
    "time_series": ZooModel(_time_series, (_SERIES_LENGTH, 1)),
    "transfer_learning": ZooModel(_transfer_learning, (32, 32, 3), high=255.0),
    "strided_cnn": ZooModel(_strided_cnn, (32, 32, 3)),
}


def inputs(name: str, leading: Tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random inputs for zoo model `name`, of shape `leading` + its example shape.

    Args:
      name: A key of `ZOO`.
      leading: The leading axes (rows, or rows and views).
      rng: The generator.

    Returns:
      Token ids below the vocabulary, or floats in [0, high).
    """
    entry = ZOO[name]
    shape = tuple(leading) + entry.example_shape
    if entry.dtype == "int32":
        return rng.integers(0, int(entry.high), shape).astype("int32")
    return (entry.high * rng.random(shape)).astype("float32")


def private_kwargs(name: str) -> dict:
    """What `make_private` needs beside the DP settings for model `name` (its input shape)."""
    entry = ZOO.get(name)
    return {"input_shape": entry.example_shape} if entry and entry.subclassed else {}
