"""Structured data (keras.io's heart-disease classification), not private.

Dict inputs: numeric features standardized by `Normalization` layers
adapted on the training set, integer and string categories one-hot encoded
by lookups, a small dense network. Generated records stand in for the
downloaded CSV (`tan_keras.data.workflow_data.patients`).
"""

import keras

from tan_keras.data import workflow_data

NUMERIC = ("age", "trestbps", "chol", "thalach", "oldpeak")
CATEGORIES = dict(sex=[0, 1], cp=[0, 1, 2, 3, 4], thal=["normal", "fixed", "reversible"])


def encode_numeric(name, x_train):
    normalizer = keras.layers.Normalization()
    normalizer.adapt(x_train[name])
    return normalizer


def main(train_size=12_000, epochs=20, verbose=2):
    (x_train, y_train), (x_test, y_test) = workflow_data.patients(train_size)
    inputs, features = {}, []
    for name in NUMERIC:
        inputs[name] = keras.Input((1,), name=name)
        features.append(encode_numeric(name, x_train)(inputs[name]))
    for name, vocabulary in CATEGORIES.items():
        inputs[name] = keras.Input((1,), name=name, dtype="string" if name == "thal" else "int64")
        lookup = keras.layers.StringLookup if name == "thal" else keras.layers.IntegerLookup
        features.append(lookup(vocabulary=vocabulary, output_mode="one_hot")(inputs[name]))
    x = keras.layers.concatenate(features)
    x = keras.layers.Dense(32, activation="relu")(x)
    x = keras.layers.Dropout(0.5)(x)
    outputs = keras.layers.Dense(1, activation="sigmoid")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    model.fit(x_train, y_train, batch_size=32, epochs=epochs, validation_split=0.2, verbose=verbose)
    return model.evaluate(x_test, y_test, verbose=0, return_dict=True)["accuracy"]


if __name__ == "__main__":
    print(f"test accuracy {main():.3f}")
