"""Small models and data for the JAX-backend tests."""

import keras
import numpy as np

import tan_keras

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

# The start of a script that runs as on a machine without TensorFlow.
NO_TENSORFLOW = """
import sys

class NoTensorFlow:
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "tensorflow":
            raise ImportError("no TensorFlow on this machine")
        return None

sys.meta_path.insert(0, NoTensorFlow())
"""


def data(rows: int, shape=(6,), classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows,) + tuple(shape)).astype("float32")
    y = rng.integers(0, classes, rows).astype("int32")
    return x, y


def dense_model(shape=(6,), classes: int = 3) -> keras.Model:
    return keras.Sequential(
        [keras.Input(shape), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(classes)]
    )


def conv_model(shape=(8, 8, 3), classes: int = 4) -> keras.Model:
    return keras.Sequential(
        [
            keras.Input(shape),
            keras.layers.Conv2D(6, 3, strides=2, activation="relu"),
            keras.layers.Conv2D(6, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(classes),
        ]
    )


def private(model, rows, batch=None, lr=1.0, **dp):
    """`model` made private over `rows` examples, compiled with SGD(lr)."""
    settings = dict(
        l2_norm_clip=1.0,
        noise_multiplier=0.0,
        expected_batch_size=batch or rows,
        dataset_size=rows,
        examples_per_chunk=4,
    )
    settings.update(dp)
    loss = settings.pop("loss", LOSS)
    metrics = settings.pop("metrics", None)
    dp_model = tan_keras.make_private(model, **settings)
    dp_model.compile(keras.optimizers.SGD(lr), loss, metrics=metrics)
    return dp_model


def update(dp_model, x, y, **fit):
    """The change of every weight after one epoch of `fit`."""
    before = [w.copy() for w in dp_model.get_weights()]
    dp_model.fit(x, y, epochs=1, verbose=0, **fit)
    return [a - b for a, b in zip(dp_model.get_weights(), before)]


def one_step(dp_model, x, y, keep=None, key=(1, 2), return_state=False):
    """One jitted `train_step` on exactly these rows: (logs, weight changes[, new state]).

    Args:
      dp_model: A compiled private model.
      x, y: The step's rows (padding included), a multiple of the chunk size.
      keep: [rows] bool, True for the rows drawn (default all).
      key: The step's noise key (two uint32).
    """
    import jax

    rows = len(y)
    keep = np.ones(rows, bool) if keep is None else np.asarray(keep, bool)
    one_view = x[:1, 0] if dp_model.dp_config.augmult > 1 else x[:1]
    dp_model._symbolic_build(data_batch=(one_view, y[:1]))
    from tan_keras.jax_dp.jax_step import training_state

    state = training_state(dp_model)
    step = {"keep": keep, "noise_key": np.tile(np.asarray(key, np.uint32), (rows, 1))}
    logs, new_state = jax.jit(dp_model.train_step)(state, (x, y, step))
    changes = [np.asarray(new) - np.asarray(old) for new, old in zip(new_state[0], state[0])]
    if return_state:
        return logs, changes, new_state
    return logs, changes


def flat(arrays) -> np.ndarray:
    return np.concatenate([np.ravel(a) for a in arrays])
