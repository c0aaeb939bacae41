"""DPKerasModel: the DP-SGD step is exactly the algorithm of docs/tan-method.md."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from _helpers import LOSS, dense_model, dp_model, flat, micro_batches, one_step

from tan_keras.keras_dp.dp_config import DPConfig
from tan_keras.keras_dp.dp_model import DPKerasModel, make_private
from tan_keras.mechanism import noise

DP = dict(l2_norm_clip=1.0, noise_multiplier=0.0, expected_batch_size=8, dataset_size=100)


def _data(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, 3, n).astype(np.int32)


def _plain_update(base, x, y, lr=0.1):
    plain = keras.models.clone_model(base)
    plain.set_weights(base.get_weights())
    plain.compile(optimizer=keras.optimizers.SGD(lr), loss=LOSS)
    plain.train_on_batch(x, y)
    return [v.numpy() for v in plain.trainable_variables]


def test_no_clipping_no_noise_equals_plain_keras_update():
    base = dense_model()
    x, y = _data()
    dp = one_step(dp_model(base, **{**DP, "l2_norm_clip": 1e6}), x, y)
    np.testing.assert_allclose(flat(dp), flat(_plain_update(base, x, y)), atol=1e-6)


def test_divides_by_expected_batch_size_not_realized_size():
    base = dense_model()
    x, y = _data()
    start = flat(base.trainable_variables)
    # 8 real rows out of 16, expected batch size 16: half the plain mean update.
    mask = np.r_[np.ones(8), np.zeros(8)]
    xx, yy = np.vstack([x, x]), np.r_[y, y]
    dp = one_step(
        dp_model(base, **{**DP, "l2_norm_clip": 1e6, "expected_batch_size": 16}), xx, yy, mask
    )
    plain = flat(_plain_update(base, x, y))
    np.testing.assert_allclose(flat(dp) - start, (plain - start) / 2, atol=1e-6)


def test_one_huge_example_moves_update_by_at_most_lr_c_over_b():
    base = dense_model()
    x, y = _data()
    lr, c, b = 0.5, 0.1, 8
    kwargs = {**DP, "l2_norm_clip": c, "expected_batch_size": b}
    without = flat(one_step(dp_model(base, lr=lr, **kwargs), x, y, mask=np.r_[np.ones(7), 0]))
    x_huge = x.copy()
    x_huge[7] *= 1e4
    with_huge = flat(one_step(dp_model(base, lr=lr, **kwargs), x_huge, y))
    moved = np.linalg.norm(with_huge - without)
    assert moved <= lr * c / b * (1 + 1e-4)
    assert moved > 0.5 * lr * c / b  # the example was used, and clipped to ~C


def _noise_only_update(noise_multiplier=2.0, c=0.5, b=50, micro=1, width=300):
    """Update of one step whose clipped sum is zero: pure noise."""
    keras.utils.set_random_seed(3)
    inp = keras.Input((width,))
    base = keras.Model(inp, keras.layers.Dense(width)(inp))  # 90,300 parameters
    model = dp_model(
        base,
        lr=1.0,
        l2_norm_clip=c,
        noise_multiplier=noise_multiplier,
        expected_batch_size=b,
        dataset_size=1000,
    )
    start = flat(model.trainable_variables)
    rows = 4 * micro
    end = one_step(model, np.zeros((rows, width)), np.zeros(rows), mask=np.zeros(rows), micro=micro)
    return flat(end) - start, noise_multiplier * c / b


def _std_matches(update, expected, rel_tol=0.03):
    """The statistical test: sample std within 3% of sigma*C/B, mean ~ 0.

    With 90,300 i.i.d. draws the std's relative standard error is 0.24%, so 3%
    is over 12 standard errors: a correct implementation never fails it.
    """
    std = update.std()
    mean_ok = abs(update.mean()) < 5 * expected / np.sqrt(update.size)
    return abs(std / expected - 1) < rel_tol and mean_ok


def test_noise_std_is_sigma_c_over_b():
    update, expected = _noise_only_update()
    assert _std_matches(update, expected), (update.std(), expected)


@pytest.mark.parametrize("factor", [0.5, 2.0, 1 / 50])
def test_power_check_noise_test_rejects_wrong_std(factor, monkeypatch):
    """Noise x0.5, x2, or calibrated for the mean (/B) must fail the same test."""
    original = noise.add_gaussian_noise
    monkeypatch.setattr(
        noise, "add_gaussian_noise", lambda g, std, gen: original(g, std * factor, gen)
    )
    update, expected = _noise_only_update()
    assert not _std_matches(update, expected)


def test_noise_is_added_once_per_logical_step_with_accumulation():
    update, expected = _noise_only_update(micro=4)
    assert _std_matches(update, expected), (update.std(), expected)


def test_one_device_draws_noise_only_on_micro_batches_that_end_a_step(monkeypatch):
    # Without a distribution strategy the noise and the update sit in a
    # tf.cond: micro-batches that end no step draw nothing (they used to
    # draw and discard a full-size sample each).
    draws = tf.Variable(0, dtype=tf.int64, trainable=False)
    original = noise.add_gaussian_noise

    def counting(grad_sum, stddev, seed):
        with tf.control_dependencies([draws.assign_add(1)]):
            return [tf.identity(g) for g in original(grad_sum, stddev, seed)]

    monkeypatch.setattr(noise, "add_gaussian_noise", counting)
    model = dp_model(dense_model(), **{**DP, "noise_multiplier": 1.0})
    x, y = _data(16)
    one_step(model, x, y, micro=4)
    one_step(model, x, y, micro=4)
    assert int(model.dp_steps.numpy()) == 2
    assert int(draws.numpy()) == 2


@pytest.mark.parametrize("micro", [2, 4])
def test_gradient_accumulation_gives_the_same_update(micro):
    base = dense_model()
    x, y = _data()
    kwargs = {**DP, "l2_norm_clip": 0.05}
    single = one_step(dp_model(base, **kwargs), x, y, micro=1)
    accumulated = one_step(dp_model(base, **kwargs), x, y, micro=micro)
    np.testing.assert_allclose(flat(accumulated), flat(single), atol=1e-6)


def test_k_identical_views_equal_k1():
    base = dense_model()
    x, y = _data()
    kwargs = {**DP, "l2_norm_clip": 0.05}
    k1 = one_step(dp_model(base, **kwargs), x, y)
    views = np.repeat(x[:, None], 3, axis=1)
    k3 = one_step(dp_model(base, augmult=3, **kwargs), views, y)
    np.testing.assert_allclose(flat(k3), flat(k1), atol=1e-6)


def test_k_views_are_clipped_once_to_c_not_k_times_c():
    base = dense_model()
    rng = np.random.default_rng(5)
    views = rng.normal(size=(1, 4, 4)).astype(np.float32) * 100
    c, lr = 0.01, 1.0
    model = dp_model(base, lr=lr, **{**DP, "l2_norm_clip": c, "expected_batch_size": 1}, augmult=4)
    start = flat(model.trainable_variables)
    moved = np.linalg.norm(flat(one_step(model, views, [1])) - start)
    assert moved <= lr * c * (1 + 1e-4)
    assert moved > lr * c * 0.5


def test_sampling_rate_and_dataset_size_do_not_depend_on_k():
    one = DPConfig(1.0, 1.0, 256, 50000, augmult=1)
    sixteen = DPConfig(1.0, 1.0, 256, 50000, augmult=16)
    assert one.sampling_rate == sixteen.sampling_rate == 256 / 50000
    assert one.dataset_size == sixteen.dataset_size


def test_nonfinite_example_never_reaches_the_weights():
    base = dense_model()
    x, y = _data()
    x[2, 1] = np.nan
    model = dp_model(base, **DP)
    ds = micro_batches(x[None], y[None], np.ones((1, 8)), [True], model)
    history = model.fit(ds, epochs=1, verbose=0)
    assert all(np.all(np.isfinite(v.numpy())) for v in model.trainable_variables)
    assert history.history["nonfinite_examples"] == [1.0]
    clean = one_step(dp_model(base, **DP), x, y, mask=np.r_[1, 1, 0, 1, 1, 1, 1, 1])
    np.testing.assert_allclose(flat(model.trainable_variables), flat(clean), atol=1e-6)


def test_metrics_report_clipping():
    base = dense_model()
    x, y = _data()
    model = dp_model(base, **{**DP, "l2_norm_clip": 1e-6})
    history = model.fit(micro_batches(x[None], y[None], np.ones((1, 8)), [True], model), verbose=0)
    assert history.history["clipped_fraction"] == [1.0]
    assert history.history["grad_norm"][0] > 0
    assert int(model.dp_steps.numpy()) == 1


def test_batch_norm_is_refused_with_an_explanation():
    inp = keras.Input((4,))
    out = keras.layers.Dense(2)(keras.layers.BatchNormalization()(inp))
    with pytest.raises(ValueError, match="GroupNormalization"):
        DPKerasModel(inp, out, **DP)


def test_activity_regularizer_is_refused():
    inp = keras.Input((4,))
    out = keras.layers.Dense(2, activity_regularizer="l2")(inp)
    with pytest.raises(ValueError, match="activity_regularizer"):
        DPKerasModel(inp, out, **DP)


@pytest.mark.parametrize(
    "name,value",
    [
        ("l2_norm_clip", 0.0),
        ("l2_norm_clip", -1.0),
        ("l2_norm_clip", float("nan")),
        ("noise_multiplier", -0.1),
        ("expected_batch_size", 0),
        ("expected_batch_size", 101),
        ("expected_batch_size", 2.5),
        ("dataset_size", 0),
        ("augmult", 0),
        ("ema_decay", 1.0),
        ("noise_seed", -3),
    ],
)
def test_bad_dp_arguments_are_refused_by_name(name, value):
    inp = keras.Input((4,))
    with pytest.raises(ValueError, match=f"Invalid value for `{name}`"):
        DPKerasModel(inp, keras.layers.Dense(2)(inp), **{**DP, name: value})


def _noise(key, step=0, replica=0, size=1000):
    seed = noise.step_seed(tf.constant(key, tf.int64), step, replica)
    return noise.add_gaussian_noise([tf.zeros([size])], 1.0, seed)[0].numpy()


def _uncorrelated(a, b):
    """|Pearson r| below 5/sqrt(n): 5 standard errors under independence."""
    return abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(len(a))


def test_noise_key_is_drawn_from_entropy_by_default():
    a, b = noise.make_noise_key(), noise.make_noise_key()
    assert a != b
    assert _uncorrelated(_noise(a), _noise(b))


def test_noise_streams_differ_across_steps_replicas_and_variables():
    key = noise.make_noise_key()
    base = _noise(key)
    assert _uncorrelated(base, _noise(key, step=1))
    assert _uncorrelated(base, _noise(key, replica=1))
    seed = noise.step_seed(tf.constant(key, tf.int64), 0, 0)
    first, second = noise.add_gaussian_noise([tf.zeros([1000])] * 2, 1.0, seed)
    assert _uncorrelated(first.numpy(), second.numpy())


def test_power_check_correlation_test_detects_reused_noise():
    key = noise.make_noise_key()
    assert not _uncorrelated(_noise(key), _noise(key))  # same step, same replica


def test_explicit_noise_seed_warns_not_private_and_is_reproducible():
    with pytest.warns(noise.NotPrivateWarning, match="NOT private"):
        a = noise.make_noise_key(7)
    with pytest.warns(noise.NotPrivateWarning):
        b = noise.make_noise_key(7)
    np.testing.assert_array_equal(_noise(a), _noise(b))


def test_saved_weights_hold_neither_noise_state_nor_accumulators(tmp_path):
    model = dp_model(dense_model(), **DP)
    names = [v.name for v in model.weights]
    assert not any(k in n for n in names for k in ("accumulator", "key", "pending")), names
    prefix = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    saved = [name for name, _ in tf.train.list_variables(prefix)]
    assert not any("noise" in n or "key" in n or "accumulator" in n for n in saved), saved


def test_jit_compile_gives_the_same_update():
    base = dense_model()
    x, y = _data()
    kwargs = {**DP, "l2_norm_clip": 0.05}
    eager = one_step(dp_model(base, **kwargs), x, y, micro=2)
    jitted = one_step(dp_model(base, jit_compile=True, **kwargs), x, y, micro=2)
    np.testing.assert_allclose(flat(jitted), flat(eager), atol=1e-5)


def test_jit_compile_noise_std():
    keras.utils.set_random_seed(3)
    inp = keras.Input((100,))
    base = keras.Model(inp, keras.layers.Dense(100)(inp))
    model = dp_model(
        base,
        lr=1.0,
        jit_compile=True,
        l2_norm_clip=1.0,
        noise_multiplier=3.0,
        expected_batch_size=10,
        dataset_size=100,
    )
    start = flat(model.trainable_variables)
    update = flat(one_step(model, np.zeros((2, 100)), np.zeros(2), mask=np.zeros(2))) - start
    assert _std_matches(update, 0.3, rel_tol=0.05)


def test_ema_follows_the_warmup_schedule():
    base = dense_model()
    x, y = _data()
    model = dp_model(base, **DP, ema_decay=0.5)
    ema = [v.numpy() for v in model.trainable_variables]
    for t in range(3):
        w = one_step(model, x, y)
        d = min(0.5, (1 + t) / (10 + t))
        ema = [d * e + (1 - d) * v for e, v in zip(ema, w)]
    np.testing.assert_allclose(flat(model.ema_variables), flat(ema), atol=1e-6)
    with model.ema_weights():
        np.testing.assert_allclose(flat(model.trainable_variables), flat(ema), atol=1e-6)
    np.testing.assert_allclose(flat(model.trainable_variables), flat(w), atol=0)


def test_save_and_load_keep_dp_config_weights_and_compile(tmp_path):
    model = dp_model(dense_model(), **DP, ema_decay=0.9)
    x, y = _data()
    one_step(model, x, y)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, DPKerasModel)
    assert loaded.dp_config == model.dp_config and loaded.ema_decay == 0.9
    np.testing.assert_array_equal(flat(loaded.get_weights()), flat(model.get_weights()))
    assert int(loaded.dp_steps.numpy()) == 1
    one_step(loaded, x, y)  # compiled again from the saved compile config
    assert int(loaded.dp_steps.numpy()) == 2


def test_make_private_wraps_sequential_and_shares_weights():
    seq = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model = make_private(seq, **DP)
    assert isinstance(model, DPKerasModel)
    assert model.trainable_variables[0] is seq.trainable_variables[0]


def test_make_private_refuses_unbuilt_subclassed_model():
    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = keras.layers.Dense(2)

        def call(self, x):
            return self.d(x)

    with pytest.raises(ValueError, match="`input_shape`.*subclassed"):
        make_private(Sub(), **DP)


def test_fit_refuses_epochs_on_unknown_length_dataset():
    model = dp_model(dense_model(), **DP)
    x, y = _data()
    ds = micro_batches(x[None], y[None], np.ones((1, 8)), [True], model).filter(lambda *a: True)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        model.fit(ds, epochs=2, verbose=0)


def test_plain_batches_are_refused_before_any_update():
    model = dp_model(dense_model(), **DP)
    x, y = _data()
    before = flat(model.get_weights())
    # (Arrays themselves are Poisson-sampled by the model: array_inputs_test.)
    plain = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(8).batch(8)
    with pytest.raises(ValueError, match="make_poisson_dataset"):
        model.fit(plain, epochs=1, verbose=0)

    # A generator is only seen batch by batch: refused when the step is traced.
    def generator():
        yield x, y

    with pytest.raises(ValueError, match="Poisson sampling"):
        model.fit(generator(), steps_per_epoch=1, verbose=0)
    np.testing.assert_array_equal(flat(model.get_weights()), before)
    assert int(model.dp_steps.numpy()) == 0
