"""The JAX-backend model as a Keras user meets it: fit, metrics, refusals, imports."""

import os
import subprocess
import sys
import textwrap

import _jax_helpers as helpers
import keras
import numpy as np
import pytest

import tan_keras
from tan_keras import _keras_internals


def _separable(rows, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 6)).astype("float32")
    return x, (x[:, 0] > 0).astype("int32")


def test_fit_on_arrays_trains_privately_and_counts_its_steps():
    x, y = _separable(600)
    dp_model = helpers.private(
        helpers.dense_model(classes=2),
        480,
        batch=60,
        lr=0.5,
        noise_multiplier=0.8,
        metrics=["accuracy"],
        examples_per_chunk=32,  # the default: chunking is tested elsewhere
    )
    history = dp_model.fit(x, y, epochs=3, validation_split=0.2, verbose=0)
    assert int(dp_model.dp_steps) == 3 * 8
    assert history.history["val_accuracy"][-1] > 0.85
    assert set(history.history) >= {"loss", "accuracy", "grad_norm", "clipped_fraction"}


@pytest.mark.parametrize("mask_metrics", [True, False])
def test_training_metrics_count_the_drawn_examples_only(monkeypatch, mask_metrics):
    # A classifier with huge margins: its cross-entropy is ~0 on every
    # example, and log(3) on a padding row (zero logits). mask_metrics=False
    # weighs every row alike, the power check.
    if not mask_metrics:
        update = _keras_internals.update_compiled_metrics

        def unmasked(model, y_true, y_pred, row_weight, weighted):
            ones = keras.ops.ones_like(row_weight)
            update(model, y_true, y_pred, ones, ones)

        monkeypatch.setattr(_keras_internals, "update_compiled_metrics", unmasked)
    x, y = _separable(200)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(2)])
    kernel = np.zeros((6, 2), "float32")
    kernel[0] = [-1e4, 1e4]
    model.set_weights([kernel, np.zeros(2, "float32")])
    metric = keras.metrics.SparseCategoricalCrossentropy(from_logits=True, name="xent")
    dp_model = helpers.private(model, 200, batch=20, lr=0.0, metrics=[metric])
    history = dp_model.fit(x, y, epochs=1, verbose=0)
    assert dp_model.evaluate(x, y, verbose=0)[1] < 1e-3
    assert (history.history["xent"][0] < 1e-3) == mask_metrics


def test_a_frozen_batch_normalization_in_inference_mode_trains():
    inputs = keras.Input((6,))
    base = keras.layers.BatchNormalization()
    base.trainable = False
    outputs = keras.layers.Dense(3)(base(inputs, training=False))
    dp_model = helpers.private(keras.Model(inputs, outputs), 16, batch=8)
    x, y = helpers.data(16)
    changes = helpers.update(dp_model, x, y)
    assert np.abs(helpers.flat(changes)).max() > 0


def _model_with_batch_norm():
    return keras.Sequential(
        [keras.Input((6,)), keras.layers.BatchNormalization(), keras.layers.Dense(3)]
    )


def _refusal(case):
    x, y = helpers.data(16)
    if case == "batch_norm":
        helpers.private(_model_with_batch_norm(), 16).fit(x, y, verbose=0)
    elif case == "steps_per_execution":
        dp_model = helpers.private(helpers.dense_model(), 16)
        dp_model.compile("sgd", helpers.LOSS, steps_per_execution=4)
        dp_model.fit(x, y, verbose=0)
    elif case == "float16":
        keras.config.set_dtype_policy("mixed_float16")
        try:
            helpers.private(helpers.dense_model(), 16)
        finally:
            keras.config.set_dtype_policy("float32")
    elif case == "loss_scale":
        dp_model = tan_keras.make_private(
            helpers.dense_model(),
            l2_norm_clip=1.0,
            noise_multiplier=1.0,
            expected_batch_size=8,
            dataset_size=16,
        )
        dp_model.compile(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()), "mse")
    elif case == "batch_size":
        helpers.private(helpers.dense_model(), 16, batch=8).fit(x, y, batch_size=4, verbose=0)
    elif case == "generator":
        helpers.private(helpers.dense_model(), 16).fit(iter([(x, y)]), verbose=0)
    elif case == "dataset_size":
        helpers.private(helpers.dense_model(), 20).fit(x, y, verbose=0)
    elif case == "clipping":
        # An option of the TensorFlow route not ported yet.
        helpers.private(helpers.dense_model(), 16, clipping="ghost")
    elif case == "train_on_batch":
        helpers.private(helpers.dense_model(), 16).train_on_batch(x, y)
    elif case == "views_shape":
        helpers.private(helpers.dense_model(), 16, augmult=2).fit(x, y, verbose=0)
    elif case == "steps_per_epoch":
        helpers.private(helpers.dense_model(), 16).fit(x, y, steps_per_epoch=3, verbose=0)


@pytest.mark.parametrize(
    "case, names",
    [
        ("batch_norm", "moving_mean"),
        ("steps_per_execution", "steps_per_execution"),
        ("float16", "float16"),
        ("loss_scale", "optimizer"),
        ("batch_size", "batch_size"),
        ("generator", "x"),
        ("dataset_size", "dataset_size"),
        ("clipping", "clipping"),
        ("train_on_batch", "train_on_batch"),
        ("steps_per_epoch", "steps_per_epoch"),
        ("views_shape", r"augmult=2 .*\[N, 2, \.\.\.\]"),
    ],
)
def test_what_would_break_the_guarantee_is_refused_by_name(case, names):
    with pytest.raises(ValueError, match=names):
        _refusal(case)


class _PenaltyFromData(keras.layers.Layer):
    """Adds a loss computed from the data it sees (as an activity regularizer does)."""

    def call(self, inputs):
        self.add_loss(keras.ops.sum(keras.ops.square(inputs)))
        return inputs


@pytest.mark.parametrize("how", ["activity_regularizer", "add_loss"])
def test_losses_added_by_the_call_are_clipped_with_their_example(how):
    # They are computed from one example's views (the per-example call), so
    # they are part of its clipped loss: a huge example still moves the
    # update by lr * C / B at most, and the penalty is not ignored.
    def model(penalty):
        dense = keras.layers.Dense(3, activity_regularizer="l2" if penalty else None)
        layers = [keras.Input((6,)), dense]
        if penalty and how == "add_loss":
            dense.activity_regularizer = None
            layers.append(_PenaltyFromData())
        built = keras.Sequential(layers)
        built.set_weights([np.full((6, 3), 0.1, "float32"), np.zeros(3, "float32")])
        return helpers.private(built, 8, batch=4, l2_norm_clip=1e6 if penalty is None else 1.0)

    x, y = helpers.data(8)
    x[7] *= 1e4
    without = np.arange(8) < 7
    _, a = helpers.one_step(model(True), x, y, keep=without)
    _, b = helpers.one_step(model(True), x, y)
    assert np.linalg.norm(helpers.flat(b) - helpers.flat(a)) <= 0.25 * (1 + 1e-4)
    _, plain = helpers.one_step(model(False), x, y, keep=without)
    assert not np.allclose(helpers.flat(a), helpers.flat(plain), atol=1e-6)


class _SeedWriter(keras.layers.Layer):
    """A hostile layer: writes its input into its random generator's state."""

    def __init__(self):
        super().__init__()
        self.generator = keras.random.SeedGenerator(0)

    def call(self, inputs, training=False):
        if training:
            secret = keras.ops.cast(keras.ops.abs(inputs[0, :2]) * 1e6, "uint32")
            self.generator.state.assign(secret)
        return inputs


def test_a_random_generator_state_carries_no_example_out_of_the_step():
    model = keras.Sequential([keras.Input((6,)), _SeedWriter(), keras.layers.Dense(3)])
    dp_model = helpers.private(model, 8)
    x, y = helpers.data(8)
    x[:, :2] = 0.654321
    index = [id(v) for v in dp_model.non_trainable_variables].index(
        id(model.layers[0].generator.state)
    )
    # The layer does write the example into the state inside its call (the
    # power of the check below) ...
    _, written = dp_model.stateless_call(
        [v.value for v in dp_model.trainable_variables],
        [v.value for v in dp_model.non_trainable_variables],
        x[:1],
        training=True,
    )
    assert 654321 in np.asarray(written[index])
    # ... and the state the step leaves holds none of it.
    _, _, state = helpers.one_step(dp_model, x, y, return_state=True)
    assert 654321 not in np.asarray(state[1][index])


def test_the_jax_backend_runs_where_tensorflow_cannot_be_imported(tmp_path):
    # TensorFlow is made unimportable, as on a machine without it: training,
    # saving, loading and the refusal of the names not ported yet all work.
    script = helpers.NO_TENSORFLOW + textwrap.dedent(
        """
        import numpy as np
        import keras
        import tan_keras
        x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
        y = (x[:, 0] > 0).astype("int32")
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        dp = tan_keras.make_private(model, l2_norm_clip=1.0, noise_multiplier=1.0,
                                    expected_batch_size=8, dataset_size=32)
        dp.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        dp.fit(x, y, epochs=1, verbose=0)
        dp.save(sys.argv[1])
        loaded = keras.saving.load_model(sys.argv[1])
        print("loaded:", type(loaded).__name__, loaded.dp_config.noise_multiplier,
              loaded.optimizer is not None)
        try:
            tan_keras.PoissonSampler
        except AttributeError as error:
            print("refused:", error)
        """
    )
    env = dict(os.environ, KERAS_BACKEND="jax")
    result = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", "-c", script, str(tmp_path / "m.keras")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded: DPKerasModel 1.0 True" in result.stdout
    assert "refused: tan_keras.PoissonSampler needs Keras's TensorFlow backend" in result.stdout


def test_load_model_restores_the_optimizer_s_momentum_and_iteration_count(tmp_path):
    # A loaded model's optimizer was left unbuilt, so Keras skipped the file's
    # optimizer variables: training resumed with zero momentum and the
    # iteration count (learning-rate schedules) back at 0.
    x, y = _separable(64)
    dp_model = tan_keras.make_private(
        helpers.dense_model(classes=2),
        l2_norm_clip=1.0,
        noise_multiplier=1.0,
        expected_batch_size=16,
        dataset_size=64,
    )
    dp_model.compile(
        keras.optimizers.SGD(0.1, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    dp_model.fit(x, y, epochs=1, verbose=0)
    path = str(tmp_path / "m.keras")
    dp_model.save(path)
    loaded = keras.saving.load_model(path)
    # (By position: the loaded layers' names may take another suffix.)
    saved = [np.asarray(v) for v in dp_model.optimizer.variables]
    restored = [np.asarray(v) for v in loaded.optimizer.variables]
    assert [a.shape for a in restored] == [a.shape for a in saved]
    assert int(np.asarray(loaded.optimizer.iterations)) == int(dp_model.dp_steps) > 0
    momentums = [a for a in saved if a.ndim > 0]
    assert momentums and all(np.abs(a).max() > 0 for a in momentums)
    for restored_value, saved_value in zip(restored, saved):
        np.testing.assert_array_equal(restored_value, saved_value)
