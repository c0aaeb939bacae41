"""Models with several inputs (list or dict) and several outputs, each with its loss.

Each example's loss is the weighted sum of its outputs' losses, averaged over
its K views, and that sum's gradient is clipped: the reference below computes
exactly that one example at a time with a plain tape, and every route must
give the same DP step.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from _helpers import dense_model, flat, step_dataset

import tan_keras
from tan_keras.keras_dp import output_losses
from tan_keras.keras_dp.dp_model import make_private

B = 6
CLIP = 0.3
LR = 0.5
CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _two_headed(seed=0, dict_io=True):
    keras.utils.set_random_seed(seed)
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    h = keras.layers.Dense(6, activation="tanh")(keras.layers.Concatenate()([a, b]))
    cls = keras.layers.Dense(3, name="cls")(h)
    reg = keras.layers.Dense(1, name="reg")(h)
    if dict_io:
        return keras.Model({"a": a, "b": b}, {"cls": cls, "reg": reg})
    return keras.Model([a, b], [cls, reg])


def _data(views, seed=1):
    rng = np.random.default_rng(seed)
    x = {
        "a": rng.normal(size=(B, views, 3)).astype(np.float32),
        "b": rng.normal(size=(B, views, 2)).astype(np.float32),
    }
    y = {
        "cls": rng.integers(0, 3, B).astype(np.int32),
        "reg": rng.normal(size=(B, 1)).astype(np.float32),
    }
    return x, y


def _reference_step(base, x, y, reg_weight, separately=False, rows=range(B)):
    """Weights after one DP-SGD step (sigma = 0), one example of `rows` at a time."""
    model = keras.models.clone_model(base)
    model.set_weights(base.get_weights())
    variables = model.trainable_variables
    total = [np.zeros(v.shape, np.float32) for v in variables]
    for i in rows:
        views = {k: v[i] for k, v in x.items()}
        views_count = views["a"].shape[0]
        with tf.GradientTape(persistent=True) as tape:
            out = model(views, training=True)
            cls_loss = tf.reduce_mean(CE(np.repeat(y["cls"][i : i + 1], views_count), out["cls"]))
            reg_true = np.repeat(y["reg"][i : i + 1], views_count, axis=0)
            reg_loss = tf.reduce_mean(tf.square(out["reg"] - reg_true))
            weighted_reg = reg_weight * reg_loss
            loss = cls_loss + weighted_reg
        terms = [loss] if not separately else [cls_loss, weighted_reg]
        for term in terms:
            # TensorFlow variables: a zero gradient is built from their dtype.
            grads = tape.gradient(
                term,
                [v.value for v in variables],
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )
            norm = np.sqrt(sum(float(tf.reduce_sum(g * g)) for g in grads))
            scale = min(1.0, CLIP / norm)
            total = [t + scale * g.numpy() for t, g in zip(total, grads)]
    return np.concatenate([(v.numpy() - LR * t / B).ravel() for v, t in zip(variables, total)])


def _private_copy(base, **kwargs):
    """A DP model (sigma = 0) of a copy of `base`, with its weights."""
    model = make_private(
        keras.models.clone_model(base),
        l2_norm_clip=CLIP,
        noise_multiplier=0.0,
        expected_batch_size=B,
        dataset_size=100,
        **kwargs,
    )
    model.set_weights(base.get_weights())
    return model


def _dp_step(base, x, y, clipping, loss, loss_weights, **kwargs):
    model = _private_copy(base, augmult=x["a"].shape[1], clipping=clipping, **kwargs)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss=loss, loss_weights=loss_weights)
    model.fit(step_dataset(model, x, y), epochs=1, verbose=0)
    return flat(model.trainable_variables)


@pytest.mark.parametrize("views", [1, 2])
@pytest.mark.parametrize("clipping", ["vectorized", "ghost", "layerwise"])
def test_each_examples_outputs_are_clipped_together(clipping, views):
    base = _two_headed()
    x, y = _data(views)
    loss = {"cls": CE, "reg": "mse"}
    got = _dp_step(base, x, y, clipping, loss, {"reg": 0.5})
    np.testing.assert_allclose(got, _reference_step(base, x, y, 0.5), atol=2e-5)
    # Power checks: clipping each output's gradient on its own (twice the
    # sensitivity), or dropping the loss weight, moves the weights elsewhere.
    assert not np.allclose(got, _reference_step(base, x, y, 0.5, separately=True), atol=1e-3)
    assert not np.allclose(got, _reference_step(base, x, y, 1.0), atol=1e-3)


@pytest.mark.parametrize("clipping", ["vectorized", "layerwise"])
def test_structured_inputs_and_outputs_in_chunks(clipping):
    # 6 examples in chunks of 4 (the last one padded): the same step, and the
    # predictions packed again by output name for the metrics.
    base = _two_headed()
    x, y = _data(2)
    model = _private_copy(base, augmult=2, clipping=clipping, examples_per_chunk=4)
    model.compile(
        optimizer=keras.optimizers.SGD(LR),
        loss={"cls": CE, "reg": "mse"},
        loss_weights={"reg": 0.5},
        metrics={"cls": ["accuracy"]},
    )
    history = model.fit(step_dataset(model, x, y), epochs=1, verbose=0).history
    want = _reference_step(base, x, y, 0.5)
    np.testing.assert_allclose(flat(model.trainable_variables), want, atol=2e-5)
    # The train step's accuracy: the view-averaged logits of the weights before the step.
    logits = np.mean([base({k: v[:, i] for k, v in x.items()})["cls"] for i in range(2)], 0)
    hits = np.argmax(logits, 1) == y["cls"]
    assert history["cls_accuracy"] == [pytest.approx(hits.mean())]
    # Power check: labels one row off would give another accuracy.
    assert (np.argmax(logits, 1) == np.roll(y["cls"], 1)).mean() != pytest.approx(hits.mean())


def test_list_inputs_and_outputs_with_losses_in_a_list():
    base = _two_headed(dict_io=False)
    dict_base = _two_headed()
    dict_base.set_weights(base.get_weights())
    x, y = _data(1)
    model = _private_copy(base)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss=[CE, "mse"], loss_weights=[1.0, 0.5])
    # Tuples: tf.data reads a Python list as one tensor to stack.
    model.fit(step_dataset(model, (x["a"], x["b"]), (y["cls"], y["reg"])), epochs=1, verbose=0)
    np.testing.assert_allclose(
        flat(model.trainable_variables), _reference_step(dict_base, x, y, 0.5), atol=2e-5
    )


def test_an_output_without_loss_needs_no_labels():
    base = _two_headed()
    x, y = _data(1)
    got = _dp_step(base, x, {"cls": y["cls"]}, "vectorized", {"cls": CE, "reg": None}, None)
    np.testing.assert_allclose(got, _reference_step(base, x, y, 0.0), atol=2e-5)


def test_poisson_pipeline_keeps_structured_features_and_labels_aligned():
    n = 40
    ids = np.arange(n, dtype=np.float32)
    features = {"a": np.stack([ids] * 3, 1), "b": np.stack([-ids] * 2, 1)}
    labels = {"cls": (np.arange(n) % 3).astype(np.int32), "reg": ids[:, None] * 10}
    sampler = tan_keras.PoissonSampler(n, 10, physical_batch_size=16)
    dataset = tan_keras.make_poisson_dataset(features, labels, sampler, steps=4, augmult=2)
    for x, y, mask, _, _ in dataset:
        assert x["a"].shape == (16, 2, 3) and x["b"].shape == (16, 2, 2)
        row = x["a"][:, 0, 0].numpy()
        np.testing.assert_array_equal(x["b"][:, 1, 0].numpy(), -row)
        np.testing.assert_array_equal(y["reg"][:, 0].numpy(), row * 10)
        np.testing.assert_array_equal(y["cls"].numpy(), row.astype(int) % 3)
        assert mask.shape == (16,)


def test_a_structured_model_trains_end_to_end_on_the_poisson_pipeline():
    n = 120
    rng = np.random.default_rng(0)
    features = {"a": rng.normal(size=(n, 3)), "b": rng.normal(size=(n, 2))}
    features = {k: v.astype(np.float32) for k, v in features.items()}
    labels = {
        "cls": (features["a"][:, 0] > 0).astype(np.int32),
        "reg": features["b"][:, :1].astype(np.float32),
    }
    model = make_private(
        _two_headed(),
        l2_norm_clip=1.0,
        noise_multiplier=0.5,
        expected_batch_size=30,
        dataset_size=n,
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss={"cls": CE, "reg": "mse"},
        metrics={"cls": ["accuracy"]},
    )
    sampler = tan_keras.PoissonSampler(n, 30)
    history = model.fit(
        tan_keras.make_poisson_dataset(features, labels, sampler), steps_per_epoch=20, verbose=0
    )
    assert "cls_accuracy" in history.history
    assert int(model.dp_steps.numpy()) == 20
    result = model.evaluate(features, labels, verbose=0, return_dict=True)
    assert result["cls_accuracy"] > 0.6 and np.isfinite(result["loss"])


def _shuffled_arrays_model(n):
    """A compiled two-headed model trained on dict arrays with fit(x, y), and its data."""
    rng = np.random.default_rng(0)
    x = {"a": rng.normal(size=(n, 3)), "b": rng.normal(size=(n, 2))}
    y = {"cls": rng.integers(0, 3, n), "reg": rng.normal(size=(n, 1))}
    model = make_private(
        _two_headed(),
        l2_norm_clip=1.0,
        noise_multiplier=1.0,
        expected_batch_size=4,
        dataset_size=n,
        sampling="shuffled",
    )
    model.compile(optimizer="sgd", loss={"cls": CE, "reg": "mse"})
    return model, x, y


def test_shuffled_sampling_takes_a_dict_of_arrays():
    model, x, y = _shuffled_arrays_model(12)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert int(model.dp_steps.numpy()) == 3


def test_per_output_sample_weights_are_refused_clearly():
    # One weight structure per output cannot weigh an example's loss before
    # clipping as one vector does; refused before it reaches the mask.
    model, x, y = _shuffled_arrays_model(8)
    weights = {"cls": np.ones(8), "reg": np.ones(8)}
    with pytest.raises(ValueError, match="Invalid value for `sample_weight`.*structure"):
        model.fit(x, y, sample_weight=weights, batch_size=4, epochs=1, verbose=0)
    assert int(model.dp_steps.numpy()) == 0


def test_an_invalid_class_label_in_one_output_drops_the_example():
    base = _two_headed()
    x, y = _data(1)
    bad = dict(y, cls=y["cls"].copy())
    bad["cls"][2] = 7  # out of [0, 3)
    model = _private_copy(base)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss={"cls": CE, "reg": "mse"})
    history = model.fit(step_dataset(model, x, bad), epochs=1, verbose=0)
    assert history.history["nonfinite_examples"][-1] == 1.0
    kept = [i for i in range(B) if i != 2]
    expected = _reference_step(base, x, y, 1.0, rows=kept)
    np.testing.assert_allclose(flat(model.trainable_variables), expected, atol=2e-5)


# ----------------------------------------------------------------- refusals
def _compiled(loss, loss_weights=None):
    model = make_private(
        _two_headed(),
        l2_norm_clip=1.0,
        noise_multiplier=1.0,
        expected_batch_size=4,
        dataset_size=100,
    )
    model.compile(optimizer="sgd", loss=loss, loss_weights=loss_weights)
    return model


def test_a_loss_for_an_unknown_output_is_refused():
    with pytest.raises(ValueError, match=r"Invalid value for `loss`: expected a dict keyed by"):
        _compiled({"cls": CE, "head": "mse"})


def test_a_loss_list_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match=r"Invalid value for `loss`: expected one entry per"):
        _compiled([CE])


def test_a_negative_loss_weight_is_refused():
    with pytest.raises(ValueError, match=r"Invalid value for `loss_weights`"):
        _compiled({"cls": CE, "reg": "mse"}, {"reg": -1.0})


def test_labels_missing_for_an_output_with_a_loss_are_refused():
    model = _compiled({"cls": CE, "reg": "mse"})
    x, y = _data(1)
    x1 = {k: v[:, 0] for k, v in x.items()}
    with pytest.raises(ValueError, match=r"Invalid value for `y`: expected labels for every"):
        model.fit(step_dataset(model, x1, {"cls": y["cls"]}), epochs=1, verbose=0)


def test_a_dict_key_wins_over_another_outputs_layer_name():
    # Keys crossing the layer names: key "z" is layer "b" (3 classes), key
    # "b" is layer "z" (regression). Keras matches losses by key.
    keras.utils.set_random_seed(0)
    a = keras.Input((3,), name="a")
    h = keras.layers.Dense(4)(a)
    cls, reg = keras.layers.Dense(3, name="b")(h), keras.layers.Dense(1, name="z")(h)
    crossed = keras.Model(a, {"z": cls, "b": reg})
    resolved = output_losses.resolve(crossed, {"b": "mse", "z": CE}, {"b": 0.5})
    by_key = {
        names[0]: (loss is not None, weight, classes)
        for names, loss, weight, classes in zip(
            resolved.names, resolved.losses, resolved.weights, resolved.sparse_classes
        )
    }
    assert by_key == {"b": (True, 0.5, None), "z": (True, 1.0, 3)}
    labels = resolved.flat_labels({"z": "cls labels", "b": "reg labels"})
    assert labels == ["reg labels" if n[0] == "b" else "cls labels" for n in resolved.names]
    # Two names of one output in one dict (key "b" and its layer's name "z"):
    # refused, not one of them silently dropped.
    renamed = keras.Model(a, {"head": cls, "b": reg})
    with pytest.raises(ValueError, match=r"Invalid value for `loss`.*'b' and 'z' name the same"):
        output_losses.resolve(renamed, {"head": CE, "b": "mse", "z": "mse"})


def test_several_label_tensors_for_one_output_are_refused():
    single = output_losses.resolve(dense_model(), CE)
    y = tf.zeros([4], tf.int32)
    assert single.flat_labels((y,)) is y and single.flat_labels({"labels": y}) is y
    # Before: a shape error deep in the step ("Dimensions must be equal").
    with pytest.raises(ValueError, match=r"Invalid value for `y`: expected one label tensor"):
        single.flat_labels((y, y))


def test_class_weight_with_several_outputs_is_refused():
    model = _compiled({"cls": CE, "reg": "mse"})
    x, y = _data(1)
    x1 = {k: v[:, 0] for k, v in x.items()}
    with pytest.raises(ValueError, match=r"Invalid value for `class_weight`"):
        model.fit(step_dataset(model, x1, y), class_weight={0: 2.0}, epochs=1, verbose=0)


def test_a_single_loss_applies_to_every_output_against_its_own_labels():
    # As in Keras: no broadcasting of one output's labels against another.
    base = _two_headed()
    x, y = _data(1)
    y_same = {"cls": y["reg"], "reg": y["reg"]}
    got = _dp_step(base, x, y_same, "vectorized", "mse", None)
    model = keras.models.clone_model(base)
    model.set_weights(base.get_weights())
    variables = model.trainable_variables
    total = [np.zeros(v.shape, np.float32) for v in variables]
    for i in range(B):
        with tf.GradientTape() as tape:
            out = model({k: v[i] for k, v in x.items()}, training=True)
            loss = tf.reduce_mean(tf.square(out["cls"] - y["reg"][i])) + tf.reduce_mean(
                tf.square(out["reg"] - y["reg"][i])
            )
        grads = tape.gradient(loss, variables)
        norm = np.sqrt(sum(float(tf.reduce_sum(g * g)) for g in grads))
        total = [t + min(1.0, CLIP / norm) * g.numpy() for t, g in zip(total, grads)]
    expected = np.concatenate([(v.numpy() - LR * t / B).ravel() for v, t in zip(variables, total)])
    np.testing.assert_allclose(got, expected, atol=2e-5)


def test_a_python_list_of_rows_is_refused_before_any_work():
    sampler = tan_keras.PoissonSampler(4, 2)
    rows = [[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [1.0, 1.0]]
    with pytest.raises(ValueError, match=r"Invalid value for `features`.*np.asarray"):
        tan_keras.make_poisson_dataset(rows, np.zeros(4), sampler)
