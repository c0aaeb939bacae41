"""A `keras.applications` base with weights built here, for the transfer-learning workflow.

No weights can be downloaded here, so the "pretrained" MobileNetV2 (alpha
0.35, 32x32 inputs) is trained on PUBLIC data first: generated shapes of 4
classes drawn with another seed than the private task's. The weights are
cached in the system's temporary directory, keyed by the settings.
"""

import os
import tempfile

import keras

from tan_keras.data import workflow_data


def mobilenet_v2_base(train_size=10_000, epochs=5, verbose=0):
    """MobileNetV2 without its top, trained on public shapes.

    Args:
      train_size: Public training images.
      epochs: Epochs of (non-private) pretraining.
      verbose: Keras verbosity of the pretraining.

    Returns:
      The base model (input 32x32x3 in [-1, 1], output a 1x1x1280 map).
    """
    base = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, include_top=False, weights=None
    )
    path = os.path.join(
        tempfile.gettempdir(), f"tan_keras_mobilenet_v2_v2_{train_size}_{epochs}.weights.h5"
    )
    if os.path.exists(path):
        base.load_weights(path)
        return base
    # Keras's MobileNetV2 moves its BatchNormalization statistics with
    # momentum 0.999: a few hundred pretraining steps would leave them near
    # their initial values, and the frozen base (inference mode) useless.
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    (x, y), _ = workflow_data.shapes(train_size, num_test=1, seed=12345)
    inputs = keras.Input((32, 32, 3))
    features = base(keras.layers.Rescaling(1.0 / 127.5, offset=-1)(inputs))
    outputs = keras.layers.Dense(4, activation="softmax")(
        keras.layers.GlobalAveragePooling2D()(features)
    )
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, batch_size=64, epochs=epochs, verbose=verbose)
    base.save_weights(path)
    return base
