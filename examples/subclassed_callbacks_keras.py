"""A subclassed model with the usual callbacks (keras.io's callbacks guides), not private.

A `keras.Model` subclass trained with EarlyStopping (restoring the best
weights), ModelCheckpoint (best only), ReduceLROnPlateau and CSVLogger, all
watching validation metrics.
"""

import os
import tempfile

import keras

from tan_keras.data import workflow_data


class ShapeClassifier(keras.Model):
    def __init__(self, num_classes=4):
        super().__init__()
        self.rescale = keras.layers.Rescaling(1.0 / 255)
        self.conv1 = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")
        self.conv2 = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.classifier = keras.layers.Dense(num_classes, activation="softmax")

    def call(self, images):
        return self.classifier(self.pool(self.conv2(self.conv1(self.rescale(images)))))


def main(train_size=12_000, epochs=10, verbose=2):
    (x_train, y_train), (x_test, y_test) = workflow_data.shapes(train_size, image_size=16)
    directory = tempfile.mkdtemp()
    callbacks = [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=3, restore_best_weights=True),
        keras.callbacks.ModelCheckpoint(
            os.path.join(directory, "best.keras"), monitor="val_accuracy", save_best_only=True
        ),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=2),
        keras.callbacks.CSVLogger(os.path.join(directory, "log.csv")),
    ]
    model = ShapeClassifier()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(
        x_train,
        y_train,
        batch_size=32,
        epochs=epochs,
        validation_split=0.2,
        callbacks=callbacks,
        verbose=verbose,
    )
    return model.evaluate(x_test, y_test, verbose=0, return_dict=True)["accuracy"]


if __name__ == "__main__":
    print(f"test accuracy {main():.3f}")
