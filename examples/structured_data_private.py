"""Structured data (keras.io's heart-disease classification), private at epsilon 8.

Dict inputs: numeric features standardized by `Normalization` layers
adapted on the training set, integer and string categories one-hot encoded
by lookups, a small dense network. Generated records stand in for the
downloaded CSV (`tan_keras.data.workflow_data.patients`).
"""

import keras

import tan_keras
from tan_keras.data import workflow_data

NUMERIC = ("age", "trestbps", "chol", "thalach", "oldpeak")
CATEGORIES = dict(sex=[0, 1], cp=[0, 1, 2, 3, 4], thal=["normal", "fixed", "reversible"])


def encode_numeric(name, x_train):
    normalizer = keras.layers.Normalization()
    tan_keras.private_adapt(normalizer, x_train[name], lower=workflow_data.PATIENT_RANGES[name][0], upper=workflow_data.PATIENT_RANGES[name][1], noise_multiplier=20)  # fmt: skip
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
    model = tan_keras.make_private_with_epsilon(model, target_epsilon=8, delta=1e-5, epochs=epochs, expected_batch_size=32, dataset_size=int(0.8 * train_size))  # fmt: skip
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    model.fit(x_train, y_train, batch_size=32, epochs=epochs, validation_split=0.2, verbose=verbose)
    return model.evaluate(x_test, y_test, verbose=0, return_dict=True)["accuracy"]


if __name__ == "__main__":
    print(f"test accuracy {main():.3f}")
