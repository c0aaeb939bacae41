"""The DP-core behaviour both Keras backends must show, through the public API only.

Collected twice: by `tests/shared_behaviour_test.py` on the TensorFlow
backend and by `tests_jax/shared_behaviour_test.py` on the JAX backend, so
one text says what `tan_keras.make_private` guarantees on either. Each case
trains with `fit(x, y)` on arrays (the model draws its Poisson steps itself);
with B = N every example is in every step (q = 1), which makes the update a
deterministic function of the data at sigma = 0. Every comparison has its
power check: the same measurement must reject a deliberately wrong answer.
"""

import keras
import numpy as np
import pytest

import tan_keras

N = 16
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _data(rows=N, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 6)).astype("float32")
    y = rng.integers(0, 3, rows).astype("int32")
    return x, y


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)]
    )


def _private(model, lr, **dp):
    settings = dict(expected_batch_size=N, dataset_size=N)
    settings.update(dp)
    private = tan_keras.make_private(model, **settings)
    private.compile(keras.optimizers.SGD(lr), LOSS)
    return private


def _weights(model):
    return [keras.ops.convert_to_numpy(v.value).copy() for v in model.trainable_variables]


def _flat(arrays):
    return np.concatenate([np.ravel(a) for a in arrays])


def _one_update(model, x, y, lr, **dp):
    """The change of the weights of `model`'s copy after one private step on all of x."""
    private = _private(model, lr, **dp)
    before = _weights(private)
    private.fit(x, y, epochs=1, verbose=0)
    assert int(private.dp_steps.numpy()) == 1
    return _flat(_weights(private)) - _flat(before)


def _plain_update(model, x, y, lr, scale=1.0):
    """One plain SGD step on the mean loss over all of x (times `scale`)."""
    plain = keras.models.clone_model(model)
    plain.set_weights(model.get_weights())
    plain.compile(keras.optimizers.SGD(lr * scale), LOSS)
    before = _weights(plain)
    plain.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    return _flat(_weights(plain)) - _flat(before)


def test_without_noise_and_clipping_the_step_is_plain_sgd_on_the_mean_loss():
    x, y = _data()
    base = _model()
    reference = _model()  # the same initial weights, kept apart from the ledger
    private = _one_update(base, x, y, 0.5, l2_norm_clip=1e6, noise_multiplier=0.0)
    plain = _plain_update(reference, x, y, 0.5)
    np.testing.assert_allclose(private, plain, rtol=1e-4, atol=1e-6)
    # Power check: a step on the summed loss (no division by B) is told apart.
    assert not np.allclose(private, _plain_update(reference, x, y, 0.5, scale=N), atol=1e-6)


@pytest.mark.parametrize("clipped", [True, False])
def test_one_example_changes_the_update_by_at_most_2_lr_c_over_b(clipped):
    # Replacing one example by a huge one moves the noiseless update by at
    # most 2 lr C / B (each one's clipped gradient is at most C); unclipped
    # (C huge: the power check) it moves it by far more.
    lr, clip = 0.5, 1.0
    x, y = _data()
    changed = x.copy()
    changed[3] *= 1e4
    dp = dict(l2_norm_clip=clip if clipped else 1e6, noise_multiplier=0.0)
    first = _one_update(_model(), x, y, lr, **dp)
    second = _one_update(_model(), changed, y, lr, **dp)
    moved = float(np.linalg.norm(first - second))
    bound = 2 * lr * clip / N
    assert (moved <= bound * (1 + 1e-5)) == clipped, (moved, bound)


class _Weights(keras.callbacks.Callback):
    """The trainable weights after every update."""

    def __init__(self):
        super().__init__()
        self.after = []

    def on_train_batch_end(self, batch, logs=None):
        self.after.append(_flat(_weights(self.model)))


def test_the_update_noise_has_std_lr_sigma_c_over_b():
    # 150 steps with a tiny learning rate: the clipped sum barely moves, so
    # the updates' spread around their mean is the noise, lr * sigma * C / B.
    lr, sigma, clip, steps = 1e-3, 8.0, 1.0, 150
    x, y = _data()
    private = _private(_model(), lr, l2_norm_clip=clip, noise_multiplier=sigma)
    recorded = _Weights()
    private.fit(x, y, epochs=steps, verbose=0, callbacks=[recorded])
    updates = np.diff(np.stack(recorded.after), axis=0)
    spread = float(np.sqrt(np.mean(np.var(updates, axis=0, ddof=1))))
    expected = lr * sigma * clip / N
    # ~12,000 degrees of freedom: the ratio's std is about 0.7%.
    assert abs(spread / expected - 1) < 0.04, spread / expected
    # Power check: 10% more or less noise is rejected by the same bound.
    for wrong in (1.1, 1 / 1.1):
        assert abs(spread / (expected * wrong) - 1) >= 0.04


def test_a_second_make_private_over_the_same_weights_counts_on_top():
    x, y = _data()
    base = _model()
    dp = dict(l2_norm_clip=1.0, noise_multiplier=1.0)
    first = _private(base, 0.1, **dp)
    first.fit(x, y, epochs=2, verbose=0)
    second = _private(base, 0.1, **dp)
    assert int(second.dp_steps.numpy()) == 2
    second.fit(x, y, epochs=1, verbose=0)
    assert int(second.dp_steps.numpy()) == 3
    # Power check: a model over other weights starts at 0.
    assert int(_private(_model(seed=1), 0.1, **dp).dp_steps.numpy()) == 0


def test_no_route_writes_private_weights_to_a_legacy_hdf5_file(tmp_path):
    # Review: `keras.saving.save_model(private, "m.h5")` and the wrapped
    # model's own `save("m.h5")` wrote the weights without their ledger; loaded
    # in a fresh process and made private, they counted 0 of 6 updates.
    x, y = _data()
    base = _model()
    private = _private(base, 0.1, l2_norm_clip=1.0, noise_multiplier=1.0)
    private.fit(x, y, epochs=1, verbose=0)
    writes = {
        "save_model": lambda path: keras.saving.save_model(private, path),
        "private.save": lambda path: private.save(path),
        "wrapped.save": lambda path: base.save(path),
    }
    for route, write in writes.items():
        path = tmp_path / f"{route}.h5"
        with pytest.raises(
            ValueError, match=r"legacy HDF5 format .*(holds no|cannot hold the privacy) ledger"
        ):
            write(str(path))
        assert not path.exists(), route
    # Power check: weights without a ledger still save in the legacy format.
    _model(seed=1).save(str(tmp_path / "public.h5"))
    assert (tmp_path / "public.h5").exists()


def test_the_budget_stops_the_updates_where_epsilon_would_pass_it():
    x, y = _data(32)
    private = tan_keras.make_private_with_epsilon(
        _model(),
        target_epsilon=2.0,
        delta=1e-5,
        epochs=2,
        expected_batch_size=8,
        dataset_size=32,
    )
    private.compile(keras.optimizers.SGD(0.1), LOSS)
    private.fit(x, y, epochs=5, verbose=0)  # more epochs than the budget allows
    assert int(private.dp_steps.numpy()) == 8  # 2 epochs of 4 steps
    assert private.privacy_ledger.epsilon(1e-5) <= 2.0


def test_plain_training_of_private_weights_and_chosen_batches_are_refused():
    x, y = _data()
    base = _model()
    private = _private(base, 0.1, l2_norm_clip=1.0, noise_multiplier=1.0)
    private.fit(x, y, epochs=1, verbose=0)
    base.compile(keras.optimizers.SGD(0.1), LOSS)
    with pytest.raises(ValueError):
        base.fit(x, y, epochs=1, verbose=0)
    with pytest.raises(ValueError):
        private.train_on_batch(x, y)
    assert int(private.dp_steps.numpy()) == 1


def _budgeted(target=2.0):
    model = tan_keras.make_private_with_epsilon(
        _model(),
        target_epsilon=target,
        delta=1e-5,
        epochs=2,
        expected_batch_size=8,
        dataset_size=32,
        verbose=False,
    )
    model.compile(keras.optimizers.SGD(0.1), LOSS)
    return model


@pytest.mark.parametrize("callbacks", ["logging", "two_accountants"])
def test_the_budget_holds_beside_accountants_of_the_users(callbacks):
    # Review: a user's logging PrivacyAccountant removed the budget of
    # make_private_with_epsilon (40 updates for 8), and of two accountants
    # the last one's lack of a cap lifted the other's.
    x, y = _data(32)
    model = _budgeted()
    mine = [tan_keras.PrivacyAccountant(delta=1e-5)]
    if callbacks == "two_accountants":
        mine = [tan_keras.PrivacyAccountant(delta=1e-5, target_epsilon=2.0)] + mine
        if keras.backend.backend() == "tensorflow":
            # Several steps per execution: the callbacks' stop comes late,
            # only the model's own cap holds (JAX takes 1 step per execution).
            model.compile(keras.optimizers.SGD(0.1), LOSS, steps_per_execution=16)
    model.fit(x, y, epochs=10, verbose=0, callbacks=mine)
    assert int(model.dp_steps.numpy()) == 8
    assert model.privacy_ledger.epsilon(1e-5) <= 2.0


def test_a_saved_and_loaded_model_keeps_its_budget(tmp_path):
    # Review: the budget was not in the model's config; a reloaded model
    # trained on past it.
    x, y = _data(32)
    model = _budgeted()
    model.fit(x, y, epochs=1, verbose=0)
    model.save(tmp_path / "budgeted.keras")
    loaded = keras.saving.load_model(tmp_path / "budgeted.keras")
    assert loaded.privacy_budget is not None
    assert loaded.privacy_budget.target_epsilon == 2.0
    loaded.fit(x, y, epochs=10, verbose=0)
    assert int(loaded.dp_steps.numpy()) == 8
    assert loaded.privacy_ledger.epsilon(1e-5) <= 2.0


@pytest.mark.parametrize("how", ["np.repeat", "concatenate", "dict of inputs"])
def test_training_rows_that_repeat_an_example_are_refused_before_any_work(how):
    # Review: oversampling (np.repeat of a rare class's rows) gave one
    # example two independent Poisson draws; it could be in a step twice,
    # its loss a group's, while epsilon counted one. A row repeats only
    # when inputs and label both do.
    x, y = _data()
    if how == "np.repeat":
        x, y = np.concatenate([x, np.repeat(x[:2], 2, axis=0)]), np.concatenate([y, y[:2], y[:2]])
    elif how == "concatenate":
        x, y = np.concatenate([x, x[5:6]]), np.concatenate([y, y[5:6]])
    model = _model()
    if how == "dict of inputs":
        inputs = {"a": keras.Input((3,), name="a"), "b": keras.Input((3,), name="b")}
        merged = keras.layers.Concatenate()([inputs["a"], inputs["b"]])
        model = keras.Model(inputs, keras.layers.Dense(3)(merged))
        x = {
            "a": np.concatenate([x[:, :3], x[7:8, :3]]),
            "b": np.concatenate([x[:, 3:], x[7:8, 3:]]),
        }
        y = np.concatenate([y, y[7:8]])
    private = _private(model, 0.1, l2_norm_clip=1.0, noise_multiplier=1.0, dataset_size=len(y))
    before = _weights(private)
    with pytest.raises(ValueError, match=r"repeat an earlier row \(row 1[67] equals row \d+"):
        private.fit(x, y, epochs=1, verbose=0)
    assert int(private.dp_steps.numpy()) == 0
    assert np.array_equal(_flat(_weights(private)), _flat(before))


def test_equal_inputs_with_other_labels_and_declared_distinct_people_train():
    # Two rows with the same inputs and different labels are two examples;
    # equal records declared to be different people's are sampled as given.
    x, y = _data()
    x[4] = x[3]
    y[4] = (y[3] + 1) % 3
    private = _private(_model(), 0.1, l2_norm_clip=1.0, noise_multiplier=1.0)
    private.fit(x, y, epochs=1, verbose=0)
    assert int(private.dp_steps.numpy()) == 1
    y[4] = y[3]
    with pytest.raises(ValueError, match="repeated_rows='distinct_people'"):
        private.fit(x, y, epochs=1, verbose=0)
    private.fit(x, y, epochs=1, verbose=0, repeated_rows="distinct_people")
    assert int(private.dp_steps.numpy()) == 2
    with pytest.raises(ValueError, match=r"`repeated_rows`.*Received: repeated_rows='allow'"):
        private.fit(x, y, epochs=1, verbose=0, repeated_rows="allow")
