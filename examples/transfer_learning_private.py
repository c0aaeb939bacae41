"""Transfer learning then fine-tuning (keras.io's transfer-learning guide), private at epsilon 8.

A `keras.applications.MobileNetV2` base (weights built here on public
shapes, `pretrained.py`), frozen and called with `training=False`, a new
head trained on the task; then the whole base unfrozen and fine-tuned at a
low learning rate, its BatchNormalization layers still in inference mode.
The task: 8 classes of shapes (shape x warm or cool colors), a harder
variant of the base's 4-class public task.
"""

import keras
import pretrained

import tan_keras
from tan_keras.data import workflow_data


def main(train_size=12_000, epochs=(5, 2), verbose=2):
    (x_train, y_train), (x_test, y_test) = workflow_data.shapes(train_size, num_classes=8)
    base = pretrained.mobilenet_v2_base()
    base.trainable = False
    inputs = keras.Input((32, 32, 3))
    x = base(keras.layers.Rescaling(1.0 / 127.5, offset=-1)(inputs), training=False)
    x = keras.layers.Dropout(0.2)(keras.layers.GlobalAveragePooling2D()(x))
    outputs = keras.layers.Dense(8, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model = tan_keras.make_private_with_epsilon(model, target_epsilon=8, delta=1e-5, epochs=sum(epochs), expected_batch_size=32, dataset_size=int(0.8 * train_size))  # fmt: skip
    loss, metrics = "sparse_categorical_crossentropy", ["accuracy"]
    model.compile(optimizer=keras.optimizers.Adam(), loss=loss, metrics=metrics)
    model.fit(
        x_train, y_train, batch_size=32, epochs=epochs[0], validation_split=0.2, verbose=verbose
    )
    base.trainable = True
    for layer in base.layers:  # the BatchNormalization layers stay in inference mode
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    model.compile(optimizer=keras.optimizers.Adam(1e-5), loss=loss, metrics=metrics)
    model.fit(
        x_train, y_train, batch_size=32, epochs=epochs[1], validation_split=0.2, verbose=verbose
    )
    return model.evaluate(x_test, y_test, verbose=0, return_dict=True)["accuracy"]


if __name__ == "__main__":
    print(f"test accuracy {main():.3f}")
