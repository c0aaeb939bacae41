"""Small models and one-step drivers shared by the DP tests."""

import keras
import numpy as np
import tensorflow as tf

from tan_keras.keras_dp.dp_model import DPKerasModel

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def dense_model(inputs=4, hidden=5, classes=3, seed=0):
    """A tiny functional MLP with fixed initial weights."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((inputs,))
    h = keras.layers.Dense(hidden, activation="tanh")(inp)
    return keras.Model(inp, keras.layers.Dense(classes)(h))


def dp_model(base, lr=0.1, jit_compile=False, **dp_kwargs):
    """Wraps `base` (sharing nothing: a copy of its weights) as a compiled DP model."""
    clone = keras.models.clone_model(base)
    clone.set_weights(base.get_weights())
    model = DPKerasModel(inputs=clone.inputs, outputs=clone.outputs, **dp_kwargs)
    model.compile(optimizer=keras.optimizers.SGD(lr), loss=LOSS, jit_compile=jit_compile)
    return model


def micro_batches(x, y, mask, ends):
    """A dataset of (x, y, mask, step_end) from stacked micro-batches."""
    return tf.data.Dataset.from_tensor_slices(
        (
            np.asarray(x, np.float32),
            np.asarray(y, np.int32),
            np.asarray(mask, np.float32),
            np.asarray(ends, bool),
        )
    )


def one_step(model, x, y, mask=None, micro=1):
    """Runs one logical step over `micro` equal micro-batches; returns weights."""
    x, y = np.asarray(x, np.float32), np.asarray(y, np.int32)
    mask = np.ones(len(x), np.float32) if mask is None else np.asarray(mask, np.float32)
    size = len(x) // micro
    ds = micro_batches(
        x.reshape((micro, size) + x.shape[1:]),
        y.reshape(micro, size),
        mask.reshape(micro, size),
        [i == micro - 1 for i in range(micro)],
    )
    model.fit(ds, epochs=1, verbose=0)
    return [v.numpy() for v in model.trainable_variables]


def flat(weights):
    return np.concatenate([np.ravel(w) for w in weights])


def updates_by_clipping_mode(base, x, y, modes, micro=2, lr=0.5, **dp_kwargs):
    """One logical step from `base`'s weights for each `clipping` mode.

    Returns:
      {mode: flat weights after the step}; each model is checked to really
      use its mode.
    """
    results = {}
    for mode in modes:
        clone = keras.models.clone_model(base)
        clone.set_weights(base.get_weights())
        model = DPKerasModel(clone.inputs, clone.outputs, clipping=mode, **dp_kwargs)
        model.compile(optimizer=keras.optimizers.SGD(lr), loss=LOSS)
        assert model.clipping == mode
        results[mode] = flat(one_step(model, x, y, micro=micro))
    return results


def refusal_line(code, stderr, name=None):
    """Checks the command lines' refusal contract and returns its one line.

    Exit status 2, exactly one "error: ..." line on stderr (the last one), no
    traceback; with `name`, the line names that flag in backticks.
    """
    assert code == 2, (code, stderr[-2000:])
    assert "Traceback" not in stderr, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr[-2000:]
    assert stderr.rstrip().endswith(lines[0]), stderr[-2000:]
    if name is not None:
        assert f"`{name}`" in lines[0], lines[0]
    return lines[0]
