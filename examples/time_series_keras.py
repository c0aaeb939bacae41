"""Time series (keras.io's FordA classification, with a GRU), not private.

A Conv1D front end that shortens the sequence, a GRU over what is left and
a sigmoid output. Generated engine-sensor series stand in for the
downloaded FordA recordings (`tan_keras.data.workflow_data.sensor_series`).
"""

import keras

from tan_keras.data import workflow_data


def build_model(length=128):
    inputs = keras.Input((length, 1))
    x = keras.layers.Conv1D(32, 5, padding="same", activation="relu")(inputs)
    x = keras.layers.MaxPooling1D(4)(x)
    x = keras.layers.Conv1D(32, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling1D(2)(x)
    x = keras.layers.GRU(32)(x)
    outputs = keras.layers.Dense(1, activation="sigmoid")(x)
    return keras.Model(inputs, outputs)


def main(train_size=12_000, epochs=10, verbose=2):
    (x_train, y_train), (x_test, y_test) = workflow_data.sensor_series(train_size)
    model = build_model()
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    model.fit(x_train, y_train, batch_size=32, epochs=epochs, validation_split=0.2, verbose=verbose)
    return model.evaluate(x_test, y_test, verbose=0, return_dict=True)["accuracy"]


if __name__ == "__main__":
    print(f"test accuracy {main():.3f}")
