"""Text (keras.io's text classification from scratch, and with a Transformer), not private.

Raw strings through `TextVectorization` with a vocabulary given up front,
an `Embedding`, then either keras.io's Conv1D stack or its Transformer
block (`MultiHeadAttention`, feed-forward, `LayerNormalization`). Generated
reviews stand in for IMDB (`tan_keras.data.workflow_data.review_texts`):
"not" flips the word after it, so word order matters.
"""

import keras

from tan_keras.data import workflow_data

WORDS = workflow_data.review_words()
SEQUENCE_LENGTH, EMBED_DIM = 12, 32


def transformer_block(x):
    attention = keras.layers.MultiHeadAttention(num_heads=2, key_dim=EMBED_DIM)(x, x)
    x = keras.layers.LayerNormalization(epsilon=1e-6)(x + attention)
    feed_forward = keras.layers.Dense(EMBED_DIM, activation="relu")(x)
    return keras.layers.LayerNormalization(epsilon=1e-6)(
        x + keras.layers.Dense(EMBED_DIM)(feed_forward)
    )


def build_model(kind):
    inputs = keras.Input((1,), dtype="string")
    vectorize = keras.layers.TextVectorization(
        vocabulary=WORDS, output_mode="int", output_sequence_length=SEQUENCE_LENGTH
    )
    x = keras.layers.Embedding(len(WORDS) + 2, EMBED_DIM)(vectorize(inputs))
    if kind == "conv1d":
        x = keras.layers.Conv1D(64, 3, padding="valid", activation="relu")(x)
        x = keras.layers.GlobalMaxPooling1D()(x)
    else:
        x = keras.layers.GlobalAveragePooling1D()(transformer_block(x))
    x = keras.layers.Dense(32, activation="relu")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid")(x)
    return keras.Model(inputs, outputs)


def main(train_size=12_000, epochs=10, kind="conv1d", verbose=2):
    (x_train, y_train), (x_test, y_test) = workflow_data.review_texts(train_size)
    model = build_model(kind)
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    model.fit(x_train, y_train, batch_size=32, epochs=epochs, validation_split=0.2, verbose=verbose)
    return model.evaluate(x_test, y_test, verbose=0, return_dict=True)["accuracy"]


if __name__ == "__main__":
    print(f"test accuracy {main():.3f}")
