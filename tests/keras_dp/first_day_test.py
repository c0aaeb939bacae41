"""What a Keras user meets on the first day: right metrics, Keras's label shapes, frozen BN.

* The training metrics count real examples only: Keras updates `metrics`
  without sample weights, so the padding rows of the Poisson micro-batches
  counted as examples (a perfect classifier showed accuracy 0.72).
* Labels of shape (N,) for a one-unit sigmoid output, as Keras accepts them.
* BatchNormalization in inference mode (frozen: the transfer-learning
  recipe, also when the rest of the base is fine-tuned) is accepted; in
  training mode it is still refused (also under a base called with
  training=False, which Keras 3 overrides in the train step).
"""

import keras
import numpy as np
import pytest
from _helpers import flat, step_dataset

import tan_keras
from tan_keras import _keras_internals
from tan_keras.mechanism import sampling

N, B = 400, 40
DP = dict(l2_norm_clip=1.0, noise_multiplier=0.0, expected_batch_size=B, dataset_size=N)


def _perfect_binary(dict_io):
    """A one-unit sigmoid classifier that is right on every example (x[:, 0] > 0)."""
    a, b = keras.Input((1,), name="a"), keras.Input((1,), name="b")
    out = keras.layers.Dense(
        1,
        activation="sigmoid",
        kernel_initializer=keras.initializers.Constant([[1000.0], [0.0]]),
        name="out",
    )(keras.layers.Concatenate()([a, b]))
    if dict_io:
        return keras.Model({"a": a, "b": b}, {"out": out})
    return keras.Model({"a": a, "b": b}, out)


def _data():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(N, 1)).astype(np.float32)
    # Padding rows repeat example 0 (label 1) with their prediction zeroed
    # (class 0): counted as examples, they would be wrong.
    a[0] = 1.0
    b = rng.normal(size=(N, 1)).astype(np.float32)
    return {"a": a, "b": b}, (a[:, 0] > 0).astype(np.float32)


@pytest.mark.parametrize("steps_per_execution", [1, 3])
@pytest.mark.parametrize("dict_io", [False, True])
def test_a_perfect_classifier_trains_at_accuracy_one_despite_padding(dict_io, steps_per_execution):
    x, y = _data()
    labels = {"out": y} if dict_io else y
    private = tan_keras.make_private(_perfect_binary(dict_io), **DP)
    private.compile(
        optimizer=keras.optimizers.SGD(0.0),
        loss="binary_crossentropy",
        metrics={"out": ["accuracy"]} if dict_io else ["accuracy"],
        steps_per_execution=steps_per_execution,
    )
    sampler = tan_keras.PoissonSampler(N, B)
    ds = tan_keras.make_poisson_dataset(x, labels, sampler)
    history = private.fit(ds, steps_per_epoch=6, verbose=0).history
    evaluated = private.evaluate(x, labels, verbose=0, return_dict=True)
    name = [k for k in evaluated if k.endswith("accuracy")][0]
    assert history[name] == [1.0]
    assert evaluated[name] == 1.0


def test_power_check_keras_unweighted_metrics_count_the_padding(monkeypatch):
    def keras_default(model, y_true, y_pred, row_weight, weighted):
        model._compile_metrics.update_state(y_true, y_pred, sample_weight=row_weight)

    monkeypatch.setattr(_keras_internals, "update_compiled_metrics", keras_default)
    # Padding rows as they were (copies of example 0, not zeros, which this
    # classifier happens to get right).
    monkeypatch.setattr(sampling, "_padding_zeroed", lambda rows, mask: rows)
    x, y = _data()
    private = tan_keras.make_private(_perfect_binary(False), **DP)
    private.compile(
        optimizer=keras.optimizers.SGD(0.0), loss="binary_crossentropy", metrics=["accuracy"]
    )
    ds = tan_keras.make_poisson_dataset(x, y, tan_keras.PoissonSampler(N, B))
    assert private.fit(ds, steps_per_epoch=6, verbose=0).history["accuracy"][0] < 0.9


def test_training_metrics_equal_evaluate_on_the_same_examples():
    rng = np.random.default_rng(1)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    private = tan_keras.make_private(model, **DP)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    private.compile(
        optimizer=keras.optimizers.SGD(0.0),
        loss=loss,
        metrics=["accuracy"],
        weighted_metrics=["accuracy"],
    )
    x = rng.normal(size=(12, 4)).astype(np.float32)
    y = rng.integers(0, 3, 12).astype(np.int32)
    mask = np.r_[np.ones(9), np.zeros(3)].astype(np.float32)  # 3 padding rows
    history = private.fit(step_dataset(private, x, y, mask), verbose=0).history
    want = private.evaluate(x[:9], y[:9], verbose=0, return_dict=True)
    assert history["accuracy"][0] == pytest.approx(want["accuracy"])
    assert history["weighted_accuracy"][0] == pytest.approx(want["accuracy"])
    assert history["loss"][0] == pytest.approx(want["loss"], rel=1e-5)


def test_labels_of_shape_n_train_a_one_unit_sigmoid_output_like_n_by_one():
    x, y = _data()
    updates = []
    for labels in (y, y[:, None]):
        keras.utils.set_random_seed(0)
        a, b = keras.Input((1,), name="a"), keras.Input((1,), name="b")
        out = keras.layers.Dense(1, activation="sigmoid")(keras.layers.Concatenate()([a, b]))
        private = tan_keras.make_private(keras.Model({"a": a, "b": b}, out), **DP)
        private.compile(optimizer=keras.optimizers.SGD(0.5), loss="binary_crossentropy")
        start = flat(private.trainable_variables)
        private.fit(step_dataset(private, {k: v[:B] for k, v in x.items()}, labels[:B]), verbose=0)
        updates.append(flat(private.trainable_variables) - start)
        private.evaluate(x, labels, verbose=0)
    assert np.abs(updates[0]).max() > 0
    np.testing.assert_allclose(updates[0], updates[1], atol=1e-7)


# ---------------------------------------------------------- BatchNormalization
def _pretrained_base():
    """A small conv base with BatchNormalization, its statistics set as if pretrained."""
    keras.utils.set_random_seed(2)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(x))
    base = keras.Model(inputs, x, name="base")
    # Pretraining on public data would have moved the moving statistics.
    base.compile(optimizer="sgd", loss="mse")
    base.fit(np.random.default_rng(2).normal(size=(64, 8, 8, 1)), np.zeros((64, 4)), verbose=0)
    return base


def _head_on(base, training):
    inputs = keras.Input((8, 8, 1))
    features = base(inputs, training=False) if training is False else base(inputs)
    return keras.Model(inputs, keras.layers.Dense(3)(features))


def _batch_norm(model):
    return [layer for layer in _keras_internals.all_layers(model) if "batch_norm" in layer.name][0]


def _freeze_batch_norms(model):
    for layer in _keras_internals.all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False


@pytest.mark.parametrize("how", ["frozen", "frozen_training_false", "fine_tune_frozen_norms"])
def test_batch_norm_in_inference_mode_is_accepted_and_keeps_examples_apart(how):
    lr, clip = 0.5, 0.1
    dp = dict(DP, l2_norm_clip=clip, expected_batch_size=8, dataset_size=80)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(8, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 3, 8).astype(np.int32)
    updates = []
    for keep_first in (1.0, 0.0):
        base = _pretrained_base()  # the same weights each time (seeded)
        if how == "fine_tune_frozen_norms":
            base.trainable = True
            _freeze_batch_norms(base)
        else:
            base.trainable = False
        model = _head_on(base, training=False if how == "frozen_training_false" else None)
        norm = _batch_norm(base)
        moving = [norm.moving_mean.numpy().copy(), norm.moving_variance.numpy().copy()]
        private = tan_keras.make_private(model, **dp)
        private.compile(
            optimizer=keras.optimizers.SGD(lr),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        start = flat(private.trainable_variables)
        mask = np.r_[keep_first, np.ones(7)].astype(np.float32)
        private.fit(step_dataset(private, x, y, mask), verbose=0)
        updates.append(flat(private.trainable_variables) - start)
        # Its statistics stay those of pretraining: nothing of the data is written.
        np.testing.assert_array_equal(norm.moving_mean.numpy(), moving[0])
        np.testing.assert_array_equal(norm.moving_variance.numpy(), moving[1])
    # One example moves the update by at most lr * C / B.
    assert 0 < np.linalg.norm(updates[0] - updates[1]) <= lr * clip / 8 * (1 + 1e-5)


@pytest.mark.parametrize("training", [None, False])
def test_batch_norm_in_training_mode_is_still_refused_with_the_way_out(training):
    base = _pretrained_base()
    with pytest.raises(ValueError, match="training mode.*layer.trainable = False"):
        tan_keras.make_private(_head_on(base, training=training), **DP)
