"""The private step on the JAX backend: equality, sensitivity, views, devices."""

import functools

import _jax_helpers as helpers
import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest


def _plain_update(model, x, y, lr):
    model.compile(keras.optimizers.SGD(lr), helpers.LOSS)
    before = [w.copy() for w in model.get_weights()]
    model.fit(x, y, batch_size=len(y), epochs=1, shuffle=False, verbose=0)
    return [a - b for a, b in zip(model.get_weights(), before)]


@pytest.mark.parametrize("l2_norm_clip, equal", [(1e6, True), (0.01, False)])
def test_without_noise_or_clipping_the_step_is_plain_sgd(l2_norm_clip, equal):
    # The second case is the power check: clipping that bites changes the
    # update, and the comparison sees it.
    x, y = helpers.data(16)
    model = helpers.dense_model()
    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    dp_model = helpers.private(model, 16, lr=0.1, l2_norm_clip=l2_norm_clip)
    private = helpers.update(dp_model, x, y)
    plain = _plain_update(twin, x, y, 0.1)
    close = np.allclose(helpers.flat(private), helpers.flat(plain), rtol=1e-5, atol=1e-7)
    assert close == equal


@pytest.mark.parametrize("l2_norm_clip", [1.0, 1e9])
def test_one_added_example_moves_the_update_by_at_most_lr_c_over_b(l2_norm_clip):
    # 1e9 is the power check: without clipping the huge example moves the
    # update beyond lr * C / B with C = 1.
    x, y = helpers.data(8)
    x[7] *= 1e3
    model = helpers.dense_model()
    # The huge example saturates the hidden layer, so its gradient is large
    # only when the model is wrong about it: give it the label the model finds
    # least likely, whatever the random initialisation (a right guess made the
    # power check flaky: 0.07 moved against the 0.375 it needs).
    y[7] = int(np.argmin(model.predict(x[7:], verbose=0)[0]))
    dp_model = helpers.private(model, 8, batch=4, lr=1.0, l2_norm_clip=l2_norm_clip)
    without = np.arange(8) < 7
    _, a = helpers.one_step(dp_model, x, y, keep=without)
    _, b = helpers.one_step(dp_model, x, y, keep=np.ones(8, bool))
    moved = np.linalg.norm(helpers.flat(b) - helpers.flat(a))
    bound = 1.0 * 1.0 / 4
    if l2_norm_clip == 1.0:
        # The huge example's gradient is clipped to exactly C.
        assert moved == pytest.approx(bound, rel=1e-4)
    else:
        assert moved > 1.5 * bound


@pytest.mark.parametrize("clipping", ["vectorized", "auto"])
@pytest.mark.parametrize("norm", ["package", "squares_only"])
def test_a_finite_gradient_whose_squares_overflow_is_clipped_not_dropped(
    norm, clipping, monkeypatch
):
    # A linear model's gradient is the input times (p - y): an input of 3e19
    # gives finite entries whose squares overflow float32. "squares_only"
    # is the power check: the plain sum of squares calls the row non-finite
    # and drops it, so it moves the update by 0. ("auto" clips the kernel by
    # its ghost norm: the same check on its rescaling.)
    from tan_keras.jax_dp import clipped_sum, ghost_norms

    if norm == "squares_only":
        monkeypatch.setattr(clipped_sum, "_rescaled_global_norm", clipped_sum._global_norm)
        monkeypatch.setattr(ghost_norms, "_rescaled", lambda a: (a, jnp.float32(1.0)))
    x, y = helpers.data(8)
    x[0] = 3e19
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    # The saturated softmax gives (p - y) = 0 when the model is right about
    # the huge row: give it the label the model finds least likely.
    y[0] = int(np.argmin(model.predict(x[:1], verbose=0)[0]))
    dp_model = helpers.private(model, 8, lr=1.0, l2_norm_clip=1.0, clipping=clipping)
    logs, with_row = helpers.one_step(dp_model, x, y)
    _, without_row = helpers.one_step(dp_model, x, y, keep=np.arange(8) > 0)
    moved = np.linalg.norm(helpers.flat(with_row) - helpers.flat(without_row))
    counted = float(logs["nonfinite_examples"])
    if norm == "package":
        assert counted == 0
        assert moved == pytest.approx(1.0 / 8, rel=1e-4)
    else:
        # (The two sums differ by rounding only.)
        assert counted == 1 and moved < 1e-6


def _clip(g, c):
    return g * min(1.0, c / max(np.linalg.norm(g), 1e-30))


def _per_view_gradients(model, views, label):
    """The gradient of each view's loss, by JAX on the plain model."""
    params = [v.value for v in model.trainable_variables]
    others = [v.value for v in model.non_trainable_variables]

    def loss(p, view):
        out, _ = model.stateless_call(p, others, view[None])
        return helpers.LOSS(np.asarray([label]), out)

    return [helpers.flat(jax.grad(loss)(params, v)) for v in views]


@pytest.mark.parametrize("average_first", [True, False])
def test_views_are_averaged_before_clipping(average_first):
    # average_first=False builds the wrong mechanism (clip each view, then
    # average): the power check that the comparison tells them apart.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 2, 6)).astype("float32")
    x[:, 1] *= 40.0
    y = np.array([0, 1, 2, 1], "int32")
    model = helpers.dense_model()
    dp_model = helpers.private(model, 4, lr=1.0, l2_norm_clip=0.5, augmult=2)
    _, changes = helpers.one_step(dp_model, x, y)
    expected = 0.0
    for views, label in zip(x, y):
        grads = _per_view_gradients(model, views, label)
        if average_first:
            expected = expected + _clip(np.mean(grads, axis=0), 0.5)
        else:
            expected = expected + np.mean([_clip(g, 0.5) for g in grads], axis=0)
    expected = -expected / 4
    close = np.allclose(helpers.flat(changes), expected, rtol=1e-4, atol=1e-6)
    assert close == average_first


def _conv_update(devices):
    keras.utils.set_random_seed(7)
    if devices > 1:
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=jax.devices()[:devices])
        )
    x, y = helpers.data(32, shape=(8, 8, 3), classes=4)
    dp_model = helpers.private(helpers.conv_model(), 32, lr=1.0, l2_norm_clip=0.05)
    return helpers.flat(helpers.update(dp_model, x, y))


@functools.cache
def _one_device_update():
    return _conv_update(1)


@pytest.mark.parametrize("devices", [2, 4])
def test_several_devices_equal_one_on_convolutions(devices):
    one = _one_device_update()
    several = _conv_update(devices)
    assert np.abs(one).max() > 1e-4
    np.testing.assert_allclose(several, one, rtol=1e-4, atol=1e-7)


def test_the_device_comparison_sees_sums_not_reduced_over_devices(monkeypatch):
    # The power check of the test above: each device's own sum, not reduced.
    one = _one_device_update()
    monkeypatch.setattr(jax.lax, "psum", lambda value, axis_name: value)
    several = _conv_update(4)
    assert not np.allclose(several, one, rtol=1e-4, atol=1e-7)


def test_random_layers_draw_for_each_example_apart():
    # Identical rows through Dropout: their gradients differ only if each
    # row draws its own mask.
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(32),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(3),
        ]
    )
    dp_model = helpers.private(model, 8, lr=1.0, l2_norm_clip=1e6)
    x = np.ones((8, 6), "float32")
    y = np.zeros(8, "int32")
    _, all_rows = helpers.one_step(dp_model, x, y)
    _, first = helpers.one_step(dp_model, x, y, keep=np.arange(8) == 0)
    assert not np.allclose(helpers.flat(all_rows), 8 * helpers.flat(first), rtol=1e-3)


def test_the_step_does_not_depend_on_the_chunk_size():
    # 40 chunks of 1 run 16 unrolled and the rest in a loop; 5 chunks of 8 are
    # all unrolled; one chunk of 40 is one vmap. Padding and a non-finite row
    # add nothing, whichever chunk holds them.
    x, y = helpers.data(40)
    x[3] = np.nan
    keep = np.arange(40) % 7 != 0
    model = helpers.dense_model()
    updates = {}
    for chunk in (1, 8, 40):
        twin = keras.models.clone_model(model)
        twin.set_weights(model.get_weights())
        dp_model = helpers.private(twin, 40, lr=1.0, l2_norm_clip=0.1, examples_per_chunk=chunk)
        logs, changes = helpers.one_step(dp_model, x, y, keep=keep)
        updates[chunk] = helpers.flat(changes)
        assert float(logs["nonfinite_examples"]) == 1
    assert np.abs(updates[40]).max() > 1e-3  # the step moved the weights
    for chunk in (1, 8):
        np.testing.assert_allclose(updates[chunk], updates[40], rtol=1e-5, atol=1e-7)
