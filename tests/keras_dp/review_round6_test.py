"""Review round 6 (issue 24): sampling and cross-example escapes an attacker found.

* Python state behind `tf.py_function` in a Lambda, an augmenter or a loss:
  no trace sees it, and each example's data reached later examples.
* A `tf.random.Generator` advanced by an amount computed from the data (or
  under a data-dependent branch) carried data in its counter.
* The content digest read float64 values as float32: a change below
  float32's precision went unseen by the step.
* The sealing function was public: a mixing generator could seal again.
* `EarlyStopping(monitor="loss")` stopped training from the noiseless
  training loss: the number of updates depended on one example.

Each escape is measured with noise 0 on neighbouring datasets (bound
2 lr C / B) or by the number of updates, with the refusal bypassed as the
power check.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from _helpers import flat

import tan_keras
from tan_keras.keras_dp import callback_checks, fit_inputs
from tan_keras.mechanism import content_digest, model_analysis, sampling

B, N, C, LR = 8, 16, 1.0, 1.0
BOUND = 2 * LR * C / B


def _seed_with_row_0_in_step(step):
    for seed in range(1, 500):
        if 0 in sampling.PoissonSampler(N, B, seed=seed).sample_indices(step).numpy():
            return seed
    raise AssertionError(f"no seed samples row 0 in step {step}")


SEED = _seed_with_row_0_in_step(0)


def _private(model, loss="mse", **dp_kwargs):
    keras.utils.set_random_seed(0)
    private = tan_keras.make_private(
        model,
        l2_norm_clip=C,
        noise_multiplier=0.0,
        expected_batch_size=B,
        dataset_size=N,
        clipping="vectorized",
        **dp_kwargs,
    )
    private.compile(optimizer=keras.optimizers.SGD(LR), loss=loss)
    return private


def _second_update(build, x, y, augmenter=None, loss="mse"):
    """The noiseless update of logical step 1, after step 0 sampled row 0."""
    model = _private(build(), loss=loss)
    sampler = sampling.PoissonSampler(N, B, seed=SEED, physical_batch_size=N)
    data = sampling.make_poisson_dataset(x, y, sampler, augmenter=augmenter)
    model.fit(data, steps_per_epoch=1, epochs=1, verbose=0)
    before = flat(model.get_weights())
    model.fit(data, steps_per_epoch=1, epochs=1, verbose=0)
    return flat(model.get_weights()) - before


class _PythonMemory:
    """Python state a `tf.py_function` keeps: the running sum of what it saw."""

    def __init__(self):
        self.seen = 0.0

    def numpy(self, t):
        out = t.numpy() + 10.0 * self.seen
        self.seen += float(t.numpy().sum())
        return out.astype(np.float32)

    def __call__(self, t):
        out = tf.py_function(self.numpy, [t], tf.float32)
        out.set_shape(t.shape)
        return out


def _data():
    rng = np.random.default_rng(3)
    return 0.01 * rng.normal(size=(N, 4)).astype(np.float32), np.zeros((N, 1), np.float32)


def _lambda_model(function):
    inp = keras.Input((4,))
    h = keras.layers.Lambda(function, output_shape=(4,))(inp)
    return keras.Model(inp, keras.layers.Dense(1, kernel_initializer="zeros")(h))


def _neighbours_moved(**run):
    x, _ = _data()
    y = np.ones((N, 1), np.float32)
    changed = x.copy()
    changed[0] = 5.0
    return np.linalg.norm(_second_update(x=x, y=y, **run) - _second_update(x=changed, y=y, **run))


def test_python_state_in_a_lambda_an_augmenter_or_a_loss_is_refused(monkeypatch):
    x, y = _data()
    with pytest.raises(ValueError, match="Python code through a EagerPyFunc op"):
        _private(_lambda_model(_PythonMemory()))
    with pytest.raises(ValueError, match="`augmenter`.*calls Python code"):
        sampling.make_poisson_dataset(
            x, y, sampling.PoissonSampler(N, B), augmenter=_PythonMemory()
        )

    def python_loss(y_true, y_pred):
        return tf.reduce_mean(tf.square(_PythonMemory()(y_pred) - y_true), axis=-1)

    with pytest.raises(ValueError, match="`loss`.*calls Python code"):
        _second_update(lambda: _lambda_model(lambda t: t), x, y, loss=python_loss)
    # Power check: without the refusal, row 0 of step 0 moves step 1's update
    # (which it is not part of) far past the bound; through an identity Lambda
    # it moves it only through the weights step 0 released.
    monkeypatch.setattr(model_analysis, "PYTHON_OPS", frozenset())
    moved = _neighbours_moved(build=lambda: _lambda_model(_PythonMemory()))
    assert moved > 2 * BOUND, moved
    assert _neighbours_moved(build=lambda: _lambda_model(lambda t: t)) < BOUND


class _SkipByData(keras.layers.Layer):
    """Writes one bit of its input into a random generator's counter, reads it back."""

    def __init__(self, guarded=False, **kwargs):
        super().__init__(**kwargs)
        self.generator = tf.random.Generator.from_seed(1)
        self.guarded = guarded

    def call(self, t):
        flag = tf.cast(tf.reduce_max(t) > 1.0, tf.int64)
        if self.guarded:
            tf.cond(flag > 0, lambda: self.generator.skip(1000), lambda: tf.constant(0, tf.int64))
        else:
            self.generator.skip(1 + 1000 * flag)
        return t + tf.cast(self.generator.normal([]), t.dtype) * 0.0


@pytest.mark.parametrize("guarded", [False, True])
def test_a_random_generator_advanced_by_the_data_is_a_write(guarded):
    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Dense(1)(_SkipByData(guarded)(inp)))
    with pytest.raises(ValueError, match="writes the variable"):
        _private(model)
    x, y = _data()
    layer = _SkipByData(guarded, name="skip_by_data")
    with pytest.raises(ValueError, match="`augmenter`.*writes the variable"):
        sampling.make_poisson_dataset(x, y, sampling.PoissonSampler(N, B), augmenter=layer)
    # Power check: a generator advanced by fixed amounts holds no data.
    generator = tf.random.Generator.from_seed(2)
    sampling.make_poisson_dataset(
        x,
        y,
        sampling.PoissonSampler(N, B),
        augmenter=lambda copies: copies + generator.normal(tf.shape(copies)),
    )


def test_a_float64_change_below_float32_precision_is_found():
    x = np.random.default_rng(4).normal(size=(3, 5))
    identity = sampling.identity_rows(0, 0, 1, N, B, 7, 3)
    sealed = content_digest._seal((x,), identity)
    nudged = x.copy()
    nudged[1, 2] *= 1 + 1e-9
    assert content_digest.matches((x,), sealed)
    assert not content_digest.matches((nudged,), sealed)
    # Power check: as float32 the two rows are one value.
    assert np.array_equal(x.astype(np.float32), nudged.astype(np.float32))


def test_no_public_function_seals_a_micro_batch():
    public = [name for name in dir(content_digest) if not name.startswith("_")]
    functions = [name for name in public if callable(getattr(content_digest, name))]
    assert set(functions) <= {"matches", "Any"}, functions


def _early_stopped_steps(first_label, callback, **dp_kwargs):
    """Logical steps made by 4 epochs of one step each, labels 1 but row 0's.

    Row 0 is in step 1: an outlier label there makes epoch 1's loss worse
    than epoch 0's, while with labels 1 the loss falls at every step.
    """
    inp = keras.Input((4,))
    model = _private(
        keras.Model(inp, keras.layers.Dense(1, kernel_initializer="zeros")(inp)), **dp_kwargs
    )
    # A small rate: the loss on labels 1 falls at every step.
    model.optimizer.learning_rate.assign(0.1)
    x, _ = _data()
    y = np.ones((N, 1), np.float32)
    y[0] = first_label
    sampler = sampling.PoissonSampler(N, B, seed=_seed_with_row_0_in_step(1), physical_batch_size=N)
    data = sampling.make_poisson_dataset(x, y, sampler)
    model.fit(data, steps_per_epoch=1, epochs=4, verbose=0, callbacks=[callback()])
    return int(model.dp_steps.numpy())


def _stop_on_loss():
    return keras.callbacks.EarlyStopping(monitor="loss", patience=1)


@pytest.mark.parametrize(
    "callback",
    [
        _stop_on_loss,
        lambda: keras.callbacks.ReduceLROnPlateau(monitor="loss"),
        lambda: keras.callbacks.ModelCheckpoint("/tmp/x.keras", "accuracy", save_best_only=True),
        # (No monitor: it reads logs["loss"]; a review stopped a run with two
        # crafted examples whose finite losses overflowed the epoch's mean.)
        keras.callbacks.TerminateOnNaN,
    ],
    ids=["EarlyStopping", "ReduceLROnPlateau", "ModelCheckpoint", "TerminateOnNaN"],
)
def test_a_callback_deciding_from_a_noiseless_training_statistic_is_refused(callback):
    with pytest.raises(ValueError, match=r"monitor=\.\.\.\)`: expected a held-out statistic"):
        _early_stopped_steps(1.0, callback)


def test_held_out_and_private_statistics_may_drive_callbacks(monkeypatch):
    for monitor in ("val_loss", "epsilon"):
        fit_inputs.check_callbacks([keras.callbacks.EarlyStopping(monitor=monitor)], True)
    fit_inputs.check_callbacks([keras.callbacks.ModelCheckpoint("/tmp/x.keras", "loss")], True)
    # Nothing is released: the training loss is not in the logs.
    assert _early_stopped_steps(100.0, _stop_on_loss, release_train_metrics=False) == 4
    # Power check: allowed, the noiseless loss decides from one example's
    # label how many updates are made.
    monkeypatch.setattr(callback_checks, "_noiseless_monitor", lambda callback, *names: None)
    assert _early_stopped_steps(1.0, _stop_on_loss) == 4
    assert _early_stopped_steps(100.0, _stop_on_loss) < 4
