"""Images with in-model augmentation (keras.io's image classification from scratch), not private.

keras.io's `data_augmentation` Sequential (random flips and rotations) at
the head of a small strided CNN. Generated shapes stand in for the
downloaded photos (`tan_keras.data.workflow_data.shapes`).
"""

import keras

from tan_keras.data import workflow_data


def build_model(image_size=32, num_classes=4):
    data_augmentation = keras.Sequential(
        [keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.1)]
    )
    inputs = keras.Input((image_size, image_size, 3))
    x = keras.layers.Rescaling(1.0 / 255)(data_augmentation(inputs))
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(64, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.25)(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def main(train_size=12_000, epochs=10, verbose=2):
    (x_train, y_train), (x_test, y_test) = workflow_data.shapes(train_size)
    model = build_model()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_train, y_train, batch_size=32, epochs=epochs, validation_split=0.2, verbose=verbose)
    return model.evaluate(x_test, y_test, verbose=0, return_dict=True)["accuracy"]


if __name__ == "__main__":
    print(f"test accuracy {main():.3f}")
