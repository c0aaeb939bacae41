"""Ghost clipping bounds the formed per-example gradients' norms, and clips as they do."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from _helpers import LOSS, flat, one_step, updates_by_clipping_mode
from layerwise_test import KINDS, _inputs, _model

from tan_keras import _keras_internals
from tan_keras.keras_dp.dp_model import DPKerasModel
from tan_keras.mechanism import ghost, per_example
from tan_keras.mechanism.clipping import clip_and_sum
from tan_keras.models import build_model
from tan_keras.models.wrn import wide_resnet

LOSS_FN = per_example.unreduced_loss_fn(LOSS)
layers = keras.layers


def _ghostable(model):
    """Every layer with a ghost rule, cheaper or not: the widest test."""
    return [layer for layer in _keras_internals.all_layers(model) if ghost.has_rule(layer)]


def _both(model, x, y, mask, clip, layers=None):
    layers = _ghostable(model) if layers is None else layers
    with_ghost = per_example.per_example_gradients(model, LOSS_FN, x, y, ghost_layers=layers)
    formed = per_example.per_example_gradients(model, LOSS_FN, x, y)
    return clip_and_sum(with_ghost[0], clip, mask), clip_and_sum(formed[0], clip, mask)


# Ghost norms are upper bounds (ghost.py), above the formed norms by at most
# this for the well-conditioned inputs here (measured: 7e-4 at worst, a 3x3
# convolution of small_cnn at K = 4, 2e-5 typical).
SLACK = 1e-3


def _assert_same(got, want, clip):
    """Same examples kept and clipped; ghost norms in [1 - 1e-6, 1 + SLACK] x formed."""
    norms, formed = got.norms.numpy(), want.norms.numpy()
    # The formed norms carry their own float32 rounding: 1e-6.
    assert np.all(norms >= formed * (1 - 1e-6)), (norms, formed)
    assert np.all(norms <= formed * (1 + SLACK) + 1e-7), (norms, formed)
    # Each clipped example's factor C / norm is at most SLACK smaller.
    atol = 1e-5 + SLACK * clip * len(norms)
    for a, b in zip(got.grad_sum, want.grad_sum):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=atol)
    np.testing.assert_array_equal(got.kept.numpy(), want.kept.numpy())
    for name in ("num_clipped", "num_nonfinite", "num_examples"):
        assert float(getattr(got, name)) == float(getattr(want, name)), name


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch,views", [(1, 1), (5, 1), (3, 4)])
def test_ghost_norms_bound_the_formed_ones_and_clip_alike(kind, batch, views):
    model = _model(kind)
    x, y = _inputs(model, batch, views, seed=batch + views)
    mask = tf.ones([batch])
    layers = _ghostable(model)
    assert layers  # each kind has a Dense or Conv2D
    formed = per_example.per_example_gradients(model, LOSS_FN, x, y)[0]
    norms = clip_and_sum(formed, 1.0, mask).norms.numpy()
    # A clip halfway between two norms: some examples clipped, some not.
    ordered = np.sort(norms)
    middle = ordered[batch // 2 - 1 : batch // 2 + 1]
    clip = float(ordered[0]) / 2 if batch == 1 else float(middle.mean())
    got, want = _both(model, x, y, mask, clip, layers)
    _assert_same(got, want, clip)
    if batch > 1:
        assert 0 < float(want.num_clipped) < batch


def test_the_ghost_entries_really_stand_in_for_the_kernels():
    model = _model("conv_same_stride")
    x, y = _inputs(model, 3, 2, seed=0)
    grads, _, _ = per_example.per_example_gradients(
        model, LOSS_FN, x, y, ghost_layers=_ghostable(model)
    )
    kinds = [isinstance(g, ghost.GhostGradient) for g in grads]
    kernels = [v.path.endswith("kernel") for v in model.trainable_variables]
    assert kinds == kernels


def test_padding_nan_and_huge_examples():
    model = _model("conv_valid_dilated")  # no normalization: scale reaches the gradient
    x, y = _inputs(model, 6, 2, seed=3)
    x = x.numpy()
    x[1, 0, 0, 0, 0] = np.nan  # dropped and counted
    x[2] *= 1e18  # finite but its squared norm overflows: clipped, not dropped
    x[4, 1, 2, 2, 1] = np.inf  # padding row holding an Inf: contributes 0
    mask = tf.constant([1, 1, 1, 1, 0, 1], tf.float32)
    got, want = _both(model, tf.constant(x), y, mask, 0.5)
    assert float(want.num_nonfinite) == 1.0
    assert bool(want.kept.numpy()[2]) and float(want.norms[2]) > 1e15
    _assert_same(got, want, 0.5)
    assert all(np.all(np.isfinite(g.numpy())) for g in got.grad_sum)


@pytest.mark.parametrize("kind", ["small_cnn", "embedding"])
def test_under_xla_and_in_chunks(kind):
    from tan_keras.mechanism import chunking

    if kind == "embedding":
        model, clip = _text_model(ids=(6,)), 0.01
        x, y = _token_batch(model, 5, 2, seed=4)
    else:
        model, clip = _model(kind), 0.1
        x, y = _inputs(model, 5, 2, seed=1)
    mask = tf.constant([1, 1, 1, 0, 1], tf.float32)
    layers = _ghostable(model)
    assert kind != "embedding" or model.get_layer("embedding") in layers

    def run(size):
        return chunking.clip_in_chunks(
            lambda v, t: per_example.per_example_gradients(model, LOSS_FN, v, t, layers),
            model.trainable_variables,
            x,
            y,
            mask,
            clip,
            size,
        )[0]

    want = clip_and_sum(per_example.per_example_gradients(model, LOSS_FN, x, y)[0], clip, mask)
    _assert_same(run(None), want, clip)
    _assert_same(run(2), want, clip)
    _assert_same(tf.function(lambda: run(2), jit_compile=True)(), want, clip)


def _conv_model(size=8, **conv):
    keras.utils.set_random_seed(6)
    inp = keras.Input((size, size, 3))
    h = layers.Conv2D(4, 3, **conv)(inp)
    return keras.Model(inp, layers.Dense(3)(layers.Flatten()(h)))


CONVS = [
    dict(padding="same"),
    dict(padding="valid"),
    dict(padding="same", strides=2),
    dict(padding="valid", strides=2),
    dict(padding="same", dilation_rate=2),
    dict(padding="valid", dilation_rate=2),
]


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("size,views", [(8, 1), (7, 2)])
def test_shifted_gram_equals_the_gram_of_unfolded_patches(conv, size, views):
    model = _conv_model(size, **conv)
    layer = model.layers[1]
    rng = np.random.default_rng(size)
    a = tf.constant(rng.normal(size=(3, views, size, size, 3)).astype(np.float32))
    patches = tf.reshape(ghost._patches(layer, tf.reshape(a, (-1, size, size, 3))), [3, -1, 27])
    want = tf.matmul(patches, patches, transpose_b=True)
    np.testing.assert_allclose(ghost._shifted_gram(layer, a).numpy(), want.numpy(), atol=1e-4)


def test_stride_one_convolutions_take_the_shifted_gram_and_match(monkeypatch):
    model = _conv_model(8, padding="same")
    x, y = _inputs(model, 5, 1, seed=7)
    assert ghost._shifted_gram_is_cheaper(model.layers[1], x)
    calls = []
    original = ghost._shifted_gram
    monkeypatch.setattr(ghost, "_shifted_gram", lambda *args: calls.append(1) or original(*args))
    got, want = _both(model, x, y, tf.ones([5]), 0.05)
    assert calls
    _assert_same(got, want, 0.05)


@pytest.mark.parametrize("kind", ["conv_same_stride", "stride_one"])
def test_the_comparison_catches_a_norm_without_cross_terms(kind, monkeypatch):
    # Power check: dropping the s != t terms of <P P^T, G G^T> (the sum of
    # per-position norms, a classic ghost-clipping bug) must fail the test.
    original = ghost.GhostGradient._input_gram

    def diagonal_only(self, inputs, batch):
        return tf.linalg.diag(tf.linalg.diag_part(original(self, inputs, batch)))

    model = _conv_model(8, padding="same") if kind == "stride_one" else _model(kind)
    x, y = _inputs(model, 4, 1, seed=5)
    monkeypatch.setattr(ghost.GhostGradient, "_input_gram", diagonal_only)
    got, want = _both(model, x, y, tf.ones([4]), 0.1)
    with pytest.raises(AssertionError):
        _assert_same(got, want, 0.1)


def test_selection_follows_the_cost_rule():
    assert ghost.is_cheaper(rows=64, fan_in=2304, units=256)  # WRN 8x8 stage
    assert not ghost.is_cheaper(rows=256, fan_in=1152, units=128)  # 16x16 stage
    wrn = build_model("wrn16_4", (32, 32, 3), 10)
    names = [layer.name for layer in ghost.select_layers(wrn, augmult=1)]
    assert names == [
        "stage3_block1_conv1",
        "stage3_block1_skip_conv",
        "stage3_block1_conv2",
        "stage3_block2_conv1",
        "stage3_block2_conv2",
        "logits",
    ]
    # K views multiply the rows: at K = 4 the 8x8 stage has 256 rows.
    assert [layer.name for layer in ghost.select_layers(wrn, augmult=4)] == ["logits"]
    # Weight-standardized convolutions transform the kernel: never ghosted.
    nf = build_model("nf_resnet50", (32, 32, 3), 10)
    assert all(type(layer).__name__ != "WSConv2D" for layer in ghost.select_layers(nf, 1))


def test_frozen_kernels_are_not_selected():
    model = _model("dense")
    model.layers[1].trainable = False
    assert [layer.name for layer in ghost.select_layers(model, 1)] == [model.layers[2].name]


def test_dp_model_ghost_agrees_with_vectorized(monkeypatch):
    keras.utils.set_random_seed(0)
    base = wide_resnet((8, 8, 3), 10, depth=10, width=1, groups=4)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, 10, 6)
    selected = []
    original = ghost.select_layers
    monkeypatch.setattr(
        ghost, "select_layers", lambda *args: selected.extend(original(*args)) or selected
    )
    dp = dict(l2_norm_clip=0.1, noise_multiplier=0.0, expected_batch_size=6, dataset_size=60)
    results = updates_by_clipping_mode(base, x, y, ("ghost", "vectorized"), **dp)
    assert selected  # the 2x2 stage and the classifier
    np.testing.assert_allclose(results["ghost"], results["vectorized"], atol=1e-6)
    assert not np.allclose(results["ghost"], flat(base.get_weights()))


def test_a_layer_without_a_ghost_rule_is_refused_before_any_work():
    # WSConv2D standardizes its kernel: a ghost rule on the raw kernel would be wrong.
    model = _model("ws_conv")
    x, y = _inputs(model, 2, 1, seed=0)
    with pytest.raises(ValueError, match="ghost_layers.*Received"):
        per_example.per_example_gradients(model, LOSS_FN, x, y, ghost_layers=model.layers[1:2])


# --- Catastrophic cancellation: the ghost norm must bound the true norm ---

X = 2.0**60  # huge rows: X^2 = 2^120 still fits float32; a power of 2 keeps X * w exact


def _old_norms(self):
    """The ghost norm as it was: sqrt(max(<P P^T, G G^T>, 0)), no error term."""
    batch = tf.shape(self.inputs[0])[0]
    g = tf.concat(
        [ghost._per_example_rows(ghost._merge_views(t), batch) for t in self.output_grads], 1
    )
    inner = self._input_gram(self.inputs, batch) * tf.matmul(g, g, transpose_b=True)
    return tf.sqrt(tf.maximum(tf.reduce_sum(inner, axis=[1, 2]), 0.0))


def _rows(gh):
    """Per example [rows, p] and [rows, o] float64 arrays of a GhostGradient (exact copies)."""
    batch = int(gh.inputs[0].shape[0])
    p_rows, g_rows = [], []
    for a, g in zip(gh.inputs, gh.output_grads):
        a = ghost._merge_views(a)
        if isinstance(gh.layer, layers.Conv2D):
            a = ghost._patches(gh.layer, a)
        p_rows.append(np.reshape(a.numpy(), (batch, -1, a.shape[-1])))
        g_rows.append(np.reshape(ghost._merge_views(g).numpy(), (batch, -1, g.shape[-1])))
    return (
        np.concatenate(p_rows, 1).astype(np.float64),
        np.concatenate(g_rows, 1).astype(np.float64),
    )


def _exact_norms(gh):
    """||P_i^T G_i||_F: float32 products are exact in float64, sums exactly rounded (fsum)."""
    p_rows, g_rows = _rows(gh)
    norms = []
    for p, g in zip(p_rows, g_rows):
        products = p[:, :, None] * g[:, None, :]  # [rows, p, o], exact
        entries = np.apply_along_axis(math.fsum, 0, products)
        top = np.abs(entries).max()  # scaled: entries**2 may underflow float64
        norms.append(top * math.sqrt(math.fsum(((entries / top) ** 2).ravel())) if top else 0.0)
    return np.array(norms)


def _triangle(gh):
    """T_i = sum_s ||p_s|| ||g_s|| in float64."""
    p_rows, g_rows = _rows(gh)
    return (np.linalg.norm(p_rows, axis=2) * np.linalg.norm(g_rows, axis=2)).sum(1)


def _pooled_dense():
    """Dense on a 2-step sequence, then average pooling: both steps share one output gradient."""
    keras.utils.set_random_seed(3)
    inp = keras.Input((2, 8))
    h = layers.GlobalAveragePooling1D()(layers.Dense(8, name="attacked")(inp))
    return keras.Model(inp, layers.Dense(3)(h))


def _pooled_conv():
    """A 3x3 "same" convolution, then global average pooling (the shifted-Gram route)."""
    keras.utils.set_random_seed(4)
    inp = keras.Input((4, 4, 16))
    conv = layers.Conv2D(32, 3, padding="same", name="attacked")
    model = keras.Model(inp, layers.Dense(3)(layers.GlobalAveragePooling2D()(conv(inp))))
    # Input channels 0-3 unused by the kernel (dead channels): the attack,
    # which lives there, reaches the Gram matrix but not the forward pass.
    kernel = conv.kernel.numpy()
    kernel[:, :, :4, :] = 0
    conv.kernel.assign(kernel)
    return model


def _two_views_dense():
    """A Dense whose input features 0-3 are dead: views differing there give one output."""
    keras.utils.set_random_seed(5)
    inp = keras.Input((8,))
    first = layers.Dense(8, name="attacked")
    model = keras.Model(inp, layers.Dense(3)(first(inp)))
    kernel = first.kernel.numpy()
    kernel[:4] = 0
    first.kernel.assign(kernel)
    return model


def _attack(kind):
    """(model, K, crafted example [K, ...], label): rows (pixels, views) X e_0 + a, -X e_0 + a.

    The X parts cancel in dW = sum_s p_s g_s^T (the output gradients g_s are
    equal), leaving 2 a g^T of norm ~1e3, while float32 Gram terms of size X^2
    swamp the a parts: <P P^T, G G^T> comes out exactly 0.
    """
    rng = np.random.default_rng(0)
    if kind == "dense_then_pooling":
        a = np.r_[0.0, rng.normal(size=7) * 1e3]
        example = np.stack([X * np.eye(8)[0] + a, -X * np.eye(8)[0] + a])[None]
        return _pooled_dense(), 1, example, 0
    if kind == "conv_then_pooling":
        a = np.r_[0.0, rng.normal(size=3) * 1e3, np.zeros(12)]  # dead channels only
        image = np.zeros((4, 4, 16))
        # Two adjacent pixels inside every receptive-field window: each kernel
        # offset sees X and -X, summed over the output positions.
        image[1, 1], image[1, 2] = a, a
        image[1, 1, 0], image[1, 2, 0] = X, -X
        return _pooled_conv(), 1, image[None], 1
    a = np.r_[0.0, rng.normal(size=3) * 1e3, np.zeros(4)]  # dead features only
    views = np.stack([X * np.eye(8)[0] + a, -X * np.eye(8)[0] + a])
    return _two_views_dense(), 2, views, 2


ATTACKS = ["dense_then_pooling", "conv_then_pooling", "two_cancelling_views"]


def _attacked_ghost(model, example, label):
    x = tf.constant(example[None].astype(np.float32))
    grads = per_example.per_example_gradients(
        model, LOSS_FN, x, tf.constant([label]), ghost_layers=[model.get_layer("attacked")]
    )[0]
    (gh,) = [g for g in grads if isinstance(g, ghost.GhostGradient)]
    return gh


@pytest.mark.parametrize("kind", ATTACKS)
def test_a_cancelling_example_gets_a_norm_above_its_true_norm(kind):
    model, _, example, label = _attack(kind)
    gh = _attacked_ghost(model, example, label)
    if kind == "conv_then_pooling":
        assert ghost._shifted_gram_is_cheaper(gh.layer, gh.inputs[0])
    true = _exact_norms(gh)
    assert true[0] > 100  # a large gradient, to be clipped
    assert float(gh.norms()[0]) >= true[0]
    # Power check: the old formula cancels to (exactly) 0 here.
    assert float(_old_norms(gh)[0]) < true[0] / 100


def _dp_step(model, views, x, y, mask, clip, lr, jit_compile=False):
    dp = dict(l2_norm_clip=clip, noise_multiplier=0.0, expected_batch_size=len(x), dataset_size=100)
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    dp_model = DPKerasModel(clone.inputs, clone.outputs, clipping="ghost", augmult=views, **dp)
    dp_model.compile(optimizer=keras.optimizers.SGD(lr), loss=LOSS, jit_compile=jit_compile)
    assert dp_model.clipping == "ghost"
    assert "attacked" in [layer.name for layer in dp_model._ghost_layers]
    return flat(one_step(dp_model, x, y, mask))


def _update_shift(kind, clip=1.0, lr=0.5, batch=4, jit_compile=False):
    """How far adding the crafted example to a batch moves one noiseless DP step."""
    model, views, example, label = _attack(kind)
    rng = np.random.default_rng(1)
    shape = (batch, views) + example.shape[1:] if views > 1 else (batch,) + example.shape[1:]
    x = rng.normal(size=shape)
    x[0] = example if views > 1 else example[0]
    y = np.r_[label, rng.integers(0, 3, batch - 1)]
    with_it = _dp_step(model, views, x, y, np.ones(batch), clip, lr, jit_compile)
    without = _dp_step(model, views, x, y, np.r_[0.0, np.ones(batch - 1)], clip, lr, jit_compile)
    return np.linalg.norm(with_it - without) / (lr * clip / batch)


@pytest.mark.parametrize("kind", ATTACKS)
def test_a_cancelling_example_moves_the_dp_update_by_at_most_lr_c_over_b(kind, monkeypatch):
    assert _update_shift(kind) <= 1 + 1e-4
    assert _update_shift(kind, jit_compile=True) <= 1 + 1e-4
    # Power check: with the old formula the example escapes clipping.
    monkeypatch.setattr(ghost.GhostGradient, "norms", _old_norms)
    assert _update_shift(kind) > 10


def _random_ill_conditioned(kind, rng):
    """A GhostGradient on random rows: scales 1e-20..1e20, cancelling, shared, subnormal."""
    batch, views = 4, int(rng.integers(1, 3))
    inp = keras.Input((4, 6) if kind.startswith("dense") else (6, 6, 2))
    if kind == "conv_same":  # stride 1: the shifted-Gram route
        layer = layers.Conv2D(3, 3, padding="same")
    elif kind == "conv_strided":  # unfolded patches
        layer = layers.Conv2D(3, 3, strides=2)
    else:
        layer = layers.Dense(5)
    layer(inp)
    calls = 2 if kind == "dense_twice" else 1
    in_shape, out_shape = tuple(inp.shape[1:]), tuple(layer.output.shape[1:])
    inputs, grads = [], []

    def per_example(low, high, ndim):
        return 10.0 ** rng.uniform(low, high, (batch,) + (1,) * (ndim - 1))

    for _ in range(calls):
        a = rng.normal(size=(batch, views) + in_shape)
        a = a * 10.0 ** rng.uniform(-4, 4, a.shape)  # ill-conditioned rows and entries
        # Rows (images) of +-v, v the first row (pixel), whose sum over the
        # output positions cancels for every kernel offset.
        if kind.startswith("dense"):
            first, sign = a[:, :, :1], np.array([1, -1, 1, -1])[:, None]
        else:
            first = a[:, :, :1, :1]
            # "same": a checkerboard inside every receptive-field window;
            # stride 2: x[r] = -x[r + 2] (positions 2 apart pair up).
            m = np.array([0, 1, -1, 1, -1, 0] if kind == "conv_same" else [1, 1, -1, -1, 1, 1])
            sign = np.outer(m, m)[:, :, None]
        cancelling = rng.random(batch) < 0.5
        a[cancelling] = first[cancelling] * sign
        a = a + rng.normal(size=a.shape) * per_example(-12, 0, a.ndim)  # ... plus a little
        a = a * per_example(-20, 20, a.ndim)
        g = rng.normal(size=(batch, views) + out_shape)
        shared = rng.random(batch) < 0.5  # one output gradient for all rows (pooling)
        g[shared] = g[shared][:, :1, :1] if kind.startswith("dense") else g[shared][:, :1, :1, :1]
        g = g * per_example(-20, 20, g.ndim)
        inputs.append(a.astype(np.float32))
        grads.append(g.astype(np.float32))
    # Example 0: some subnormal inputs (flushed to zero on CPU) beside tiny normal ones.
    inputs[0][0] = inputs[0][0] / np.abs(inputs[0][0]).max() * 1e-30
    inputs[0][0].flat[::3] = 1e-40
    return ghost.GhostGradient(
        layer, tuple(map(tf.constant, inputs)), tuple(map(tf.constant, grads))
    )


@pytest.mark.parametrize("kind", ["dense", "dense_twice", "conv_same", "conv_strided"])
def test_the_bound_holds_on_random_ill_conditioned_rows(kind):
    rng = np.random.default_rng(["dense", "dense_twice", "conv_same", "conv_strided"].index(kind))
    escapes = 0
    for _ in range(15):
        gh = _random_ill_conditioned(kind, rng)
        bound, exact = gh.norms().numpy().astype(np.float64), _exact_norms(gh)
        assert np.all(bound >= exact * (1 - 1e-12)), (bound, exact)
        # Power check: the old formula, even on rescaled rows, falls below.
        p_scaled, g_scaled = ghost._unit_scaled(gh.inputs), ghost._unit_scaled(gh.output_grads)
        old = _old_norms(ghost.GhostGradient(gh.layer, p_scaled.tensors, g_scaled.tensors))
        old = old.numpy() * 2.0 ** (p_scaled.exponent + g_scaled.exponent).numpy()
        escapes += np.sum(old < exact * (1 - 1e-6))
        # Never above the triangle bound T by more than its rounding allowance,
        # and the underflow allowances: 2^-62 sqrt(p) max|P| max|G| per row, or so,
        # and the floor 2^-126 (Inf only when T is beyond float32).
        p_rows, g_rows = _rows(gh)
        rows, p, o = p_rows.shape[1], p_rows.shape[2], g_rows.shape[2]
        scales = np.abs(p_rows).max((1, 2)) * np.abs(g_rows).max((1, 2))
        slack = 2.0**-55 * rows * math.sqrt(p * o) * scales + 2.0**-126
        triangle = _triangle(gh)
        assert np.all((bound <= triangle * (1 + 1e-5) + slack) | (triangle > 3e38)), bound
        # The squared bounds (clipping.py's fast path) too.
        np.testing.assert_array_less(exact**2 * (1 - 1e-12), gh.squared_norms().numpy() + 1e-45)
    assert escapes >= 3


def test_special_examples_keep_their_meaning():
    model = _pooled_dense()
    layer = model.get_layer("attacked")
    a = np.ones((5, 1, 2, 8), np.float32)
    g = np.ones((5, 1, 2, 8), np.float32)
    a[0] = 0  # zero inputs: norm 0
    g[1] = 0  # zero output gradient: norm 0
    a[2, 0, 0, 0] = np.nan  # dropped by clipping.py
    g[3, 0, 1, 2] = -np.inf
    a[4] *= 1e30  # finite, norm 3.2e31: the rescaled path
    gh = ghost.GhostGradient(layer, (tf.constant(a),), (tf.constant(g),))
    norms = gh.norms().numpy()
    assert norms[0] == 0 and norms[1] == 0
    assert np.isnan(norms[2]) and np.isnan(norms[3])
    assert 1 <= norms[4] / (2 * 8 * 1e30) <= 1 + 1e-4  # rows sum to 2 x ones: norm 2 * 8 * 1e30
    assert gh.rescaled_norms().numpy()[4] == norms[4]
    assert np.isinf(gh.squared_norms().numpy()[4])  # so clipping.py takes the rescaled path


# --- Embedding: each example's table rows, summed by token ---


def _text_model(head="average", vocab=50, dim=8, ids=(6,), dtype="int32", mask_zero=False):
    """Embedding -> pooling (or Flatten) -> Dense, on `ids`-shaped token ids."""
    keras.utils.set_random_seed(7)
    inp = keras.Input(ids, dtype=dtype)
    h = layers.Embedding(vocab, dim, mask_zero=mask_zero, name="embedding")(inp)
    h = layers.GlobalAveragePooling1D()(h) if head == "average" else layers.Flatten()(h)
    return keras.Model(inp, layers.Dense(3)(h))


def _token_batch(model, batch, views, seed, tokens=4):
    """[batch, K, *ids] ids from `tokens` tokens only: every example repeats some.

    Id 0 (padding with mask_zero) is among them, but every example has others.
    """
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, tokens, (batch, views) + tuple(model.inputs[0].shape[1:]))
    ids.reshape(batch, -1)[:, 0] = 1 + np.arange(batch) % (tokens - 1)
    x = tf.constant(ids.astype(model.inputs[0].dtype))
    return x, tf.constant(rng.integers(0, 3, batch).astype(np.int32))


def _repeats(x):
    """Whether every example repeats an id (over its views' positions)."""
    rows = np.reshape(np.asarray(x), (len(x), -1))
    return all(len(set(row)) < len(row) for row in rows)


TEXT_CASES = [
    # (head, views, ids shape, id dtype, mask_zero)
    ("average", 1, (6,), "int32", False),
    ("average", 3, (6,), "int64", True),
    ("flatten", 1, (5,), "float32", False),
    ("flatten", 3, (2, 3), "int32", False),
]


@pytest.mark.parametrize("head,views,ids,dtype,mask_zero", TEXT_CASES)
def test_embedding_ghost_norms_and_clipped_sum_equal_the_formed_ones(
    head, views, ids, dtype, mask_zero
):
    model = _text_model(head, ids=ids, dtype=dtype, mask_zero=mask_zero)
    x, y = _token_batch(model, 5, views, seed=views)
    assert _repeats(x)
    mask = tf.constant([1, 1, 1, 0, 1], tf.float32)
    formed = per_example.per_example_gradients(model, LOSS_FN, x, y)[0]
    norms = np.sort(clip_and_sum(formed, 1.0, tf.ones([5])).norms.numpy())
    clip = float(norms[1:3].mean())  # some examples clipped, some not
    embedding = model.get_layer("embedding")
    grads = per_example.per_example_gradients(model, LOSS_FN, x, y, ghost_layers=[embedding])[0]
    kinds = [isinstance(g, ghost.GhostGradient) for g in grads]
    assert kinds == [v is embedding.embeddings for v in model.trainable_variables]
    got, want = clip_and_sum(grads, clip, mask), clip_and_sum(formed, clip, mask)
    _assert_same(got, want, clip)
    assert 0 < float(want.num_clipped) < 4
    # Tighter than SLACK: the same rows, summed alike, plus a bound of their
    # rounding; so each example's factor min(1, C / norm), and its share of
    # the sum (at most C), moves by 1e-5 of itself at most.
    np.testing.assert_allclose(got.norms.numpy(), want.norms.numpy(), rtol=1e-5)
    for a, b in zip(got.grad_sum, want.grad_sum):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5 * clip * 5 + 1e-7)


def test_an_embedding_called_twice_clips_the_sum_of_both_calls():
    # A shared table (two calls, here overlapping ids): each example's rows
    # of a token add up across the calls before the norm, as in the formed gradient.
    keras.utils.set_random_seed(11)
    inp = keras.Input((6,), dtype="int32")
    embedding = layers.Embedding(50, 8, name="embedding")
    h = layers.Concatenate(axis=1)([embedding(inp), embedding(inp[:, :3])])
    model = keras.Model(inp, layers.Dense(3)(layers.GlobalAveragePooling1D()(h)))
    x, y = _token_batch(model, 4, 2, seed=6)
    got, want = _both(model, x, y, tf.ones([4]), 0.01, layers=[embedding])
    _assert_same(got, want, 0.01)
    np.testing.assert_allclose(got.norms.numpy(), want.norms.numpy(), rtol=1e-5)


def test_negative_embedding_ids_read_the_rows_keras_reads():
    # Keras's take reads an id in [-vocab, 0) as row id + vocab: the ghost
    # route must sum it into that row, as the formed gradient does (here -1
    # and 49 in one example: one row of the table).
    model = _text_model(vocab=50, ids=(6,))
    x, y = _token_batch(model, 4, 1, seed=3)
    x = x.numpy()
    x[0, 0, :2] = [-1, 49]
    x[1, 0, 2] = -50
    x = tf.constant(x)
    embedding = model.get_layer("embedding")
    _assert_same(*_both(model, x, y, tf.ones([4]), 0.01, layers=[embedding]), 0.01)
    # Power check: negative ids dropped (read as out of range) are caught.
    original = ghost._token_ids

    def dropped(t, vocab):
        return original(tf.where(t < 0, tf.cast(-vocab - 1, t.dtype), t), vocab)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ghost, "_token_ids", dropped)
        with pytest.raises(AssertionError):
            _assert_same(*_both(model, x, y, tf.ones([4]), 0.01, layers=[embedding]), 0.01)


def _norms_without_repeats(layer, ids, grads):
    """The classic slip: sum_j ||g_j||^2, as if an example's ids were all distinct."""
    g = [tf.reshape(tf.cast(t, tf.float32), [tf.shape(t)[0], -1]) for t in grads]
    return tf.norm(tf.concat(g, 1), axis=1)


def test_the_comparison_catches_an_embedding_norm_that_ignores_repeated_ids(monkeypatch):
    # Power check: dropping the [t_j == t_k] cross terms must fail the test above.
    model = _text_model(ids=(6,))
    x, y = _token_batch(model, 4, 1, seed=5)
    assert _repeats(x)
    clip = 1e-3  # every example clipped: the norms scale the sum
    embedding = model.get_layer("embedding")
    grads = per_example.per_example_gradients(model, LOSS_FN, x, y, ghost_layers=[embedding])[0]
    (gh,) = [g for g in grads if isinstance(g, ghost.GhostGradient)]
    formed = per_example.per_example_gradients(model, LOSS_FN, x, y)[0]
    index = [v is embedding.embeddings for v in model.trainable_variables].index(True)
    table_norms = np.linalg.norm(np.reshape(formed[index].numpy(), (4, -1)), axis=1)
    np.testing.assert_allclose(gh.norms().numpy(), table_norms, rtol=1e-5)
    # After average pooling all positions share g, so an id seen n times has
    # a row of norm n ||g||, which the slip counts as sqrt(n) ||g||: with one
    # pair among 6 ids, sqrt(6 / 8) of the norm.
    slip = _norms_without_repeats(embedding, gh.inputs, gh.output_grads).numpy()
    assert np.all(slip < table_norms * 0.9), (slip, table_norms)
    monkeypatch.setattr(ghost, "_embedding_norms", _norms_without_repeats)
    got, want = _both(model, x, y, tf.ones([4]), clip)
    with pytest.raises(AssertionError):
        _assert_same(got, want, clip)
    # With distinct ids the slip is right, and passes: the repeats are what is tested.
    distinct = tf.constant(np.arange(24).reshape(4, 1, 6).astype(np.int32))
    _assert_same(*_both(model, distinct, y, tf.ones([4]), clip), clip)


def test_the_comparison_catches_embedding_rows_summed_across_examples(monkeypatch):
    # Power check for per-example isolation: slots shared by all examples
    # (the k-th distinct id of each one summed into slot k, the per-example
    # offset forgotten) must fail the comparison with the formed gradients.
    original = ghost._sum_by_token

    def shared_slots(ids, g):
        grouped = original(ids, g)
        slots = tf.math.floormod(grouped.slots, tf.shape(ids)[1])
        g = tf.reshape(tf.gather(g, grouped.order, batch_dims=1), [-1, g.shape[-1]])
        sums = tf.math.unsorted_segment_sum(g, slots, tf.size(slots))
        return grouped._replace(sums=sums, slots=slots)

    model = _text_model(ids=(6,))
    x, y = _token_batch(model, 4, 1, seed=5)
    _assert_same(*_both(model, x, y, tf.ones([4]), 1e-3), 1e-3)
    monkeypatch.setattr(ghost, "_sum_by_token", shared_slots)
    with pytest.raises(AssertionError):
        _assert_same(*_both(model, x, y, tf.ones([4]), 1e-3), 1e-3)


class _TiedProjection(layers.Layer):
    """Scores a pooled vector against every row of an Embedding's table (tied weights)."""

    def __init__(self, embedding, **kwargs):
        super().__init__(**kwargs)
        self.embedding = embedding

    def call(self, h):
        return tf.matmul(h, self.embedding.embeddings, transpose_b=True)


def test_embedding_selection_follows_its_cost_rule(monkeypatch):
    assert ghost.embedding_is_cheaper(rows=32, vocab=20000, dim=64)
    assert not ghost.embedding_is_cheaper(rows=64, vocab=48, dim=16)  # more ids than tokens
    large = _text_model(vocab=1000, ids=(4,))
    embedding = large.get_layer("embedding")
    assert embedding in ghost.select_layers(large, augmult=1)
    # 6 ids (3 sort steps) x (8 + 3) = 66 against 8 x 8 = 64: forming is cheaper.
    small = _text_model(vocab=8, ids=(6,))
    assert small.get_layer("embedding") not in ghost.select_layers(small, augmult=1)
    # K views multiply the rows: 60 x (8 + 6) = 840 > 50 x 8.
    medium = _text_model(vocab=50, ids=(6,))
    assert medium.get_layer("embedding") in ghost.select_layers(medium, augmult=1)
    assert medium.get_layer("embedding") not in ghost.select_layers(medium, augmult=10)
    # LoRA and quantized tables keep formed gradients.
    lora = layers.Embedding(1000, 8, lora_rank=2)
    lora.build()
    quantized = layers.Embedding(1000, 8)
    quantized.build()
    quantized.quantize("int8")
    assert not ghost.has_rule(lora) and not ghost.has_rule(quantized)
    # A table also read by an output projection is tied: never ghosted.
    keras.utils.set_random_seed(8)
    inp = keras.Input((4,), dtype="int32")
    tied = layers.Embedding(1000, 8, name="embedding")
    scores = _TiedProjection(tied)(layers.GlobalAveragePooling1D()(tied(inp)))
    model = keras.Model(inp, layers.Dense(3)(scores))
    assert tied not in ghost.select_layers(model, 1)
    # Power check: without the exclusion, it would be (it pays).
    monkeypatch.setattr(ghost.model_analysis, "tied_variables", lambda _: {})
    assert tied in ghost.select_layers(model, 1)


def test_embedding_special_examples_keep_their_meaning():
    layer = _text_model().get_layer("embedding")
    ids = np.array([[[1, 2, 1, 3]]] * 5)
    g = np.ones((5, 1, 4, 8), np.float32)
    g[0] = 0  # zero output gradient: norm 0
    g[1, 0, 2, 3] = np.nan  # dropped by clipping.py
    g[2, 0, 0, 1] = -np.inf
    g[3] *= 1e30  # finite, norm 1e30 sqrt(8 (4 + 1 + 1)): the rescaled path
    g[4] = 1e-41  # subnormal (flushed on CPU): a tiny norm, never 0 for nonzero g
    gh = ghost.GhostGradient(layer, (tf.constant(ids),), (tf.constant(g),))
    norms = gh.norms().numpy()
    assert norms[0] == 0
    assert np.isnan(norms[1]) and np.isnan(norms[2])
    assert 1 <= norms[3] / (1e30 * math.sqrt(48)) <= 1 + 1e-5
    assert 0 < norms[4] < 1e-30
    assert np.isinf(gh.squared_norms().numpy()[3])  # so clipping.py takes the rescaled path


def _exact_embedding_norms(ids, g):
    """||R_i||_F in float64: rows summed exactly (fsum) by token."""
    norms = []
    for row_ids, rows in zip(ids.reshape(len(ids), -1), g.reshape(len(g), -1, g.shape[-1])):
        table = {}
        for token, row in zip(row_ids, rows.astype(np.float64)):
            table.setdefault(int(token), []).append(row)
        sums = np.array([[math.fsum(col) for col in zip(*rows_)] for rows_ in table.values()])
        top = np.abs(sums).max()
        norms.append(top * math.sqrt(math.fsum(((sums / top) ** 2).ravel())) if top else 0.0)
    return np.array(norms)


def test_the_embedding_bound_holds_on_cancelling_ill_conditioned_rows():
    layer = _text_model().get_layer("embedding")
    rng = np.random.default_rng(9)
    escapes = 0
    for _ in range(10):
        ids = rng.integers(0, 3, (4, 2, 5))
        g = rng.normal(size=(4, 2, 5, 8)) * 10.0 ** rng.uniform(-6, 6, (4, 2, 5, 1))
        g = (g * 10.0 ** rng.uniform(-20, 20, (4, 1, 1, 1))).astype(np.float32)
        # Example 0: rows a, b, -fl(a + b) of one token, the rest 0: the exact
        # sum is the rounding error of a + b, which float32 sums return as 0.
        ids[0], g[0] = 1, 0
        g[0, 0, 0], g[0, 0, 1] = g[1, 0, 0], 3 * g[2, 0, 0]
        g[0, 0, 2] = -(g[0, 0, 0] + g[0, 0, 1])
        gh = ghost.GhostGradient(layer, (tf.constant(ids),), (tf.constant(g),))
        bound, exact = gh.norms().numpy().astype(np.float64), _exact_embedding_norms(ids, g)
        assert np.all(bound >= exact), (bound, exact)
        # Close on the others (no cancellation): the slack is rounding-sized.
        np.testing.assert_allclose(bound[1:], exact[1:], rtol=1e-5)
        # Power check: the norm of the rows as summed, without the rounding
        # allowance, falls below the exact one.
        rows = ghost._embedding_rows(layer, gh.inputs, gh.output_grads)
        sums = ghost._sum_by_token(*rows).sums.numpy().astype(np.float64)
        escapes += np.sum(np.linalg.norm(sums.reshape(4, -1), axis=1) < exact * (1 - 1e-6))
    assert escapes >= 5


@pytest.mark.parametrize("views", [1, 2])
def test_dp_model_with_a_ghost_embedding_trains_like_vectorized(views, monkeypatch):
    base = _text_model(vocab=200, ids=(6,))
    x, y = _token_batch(base, 6, views, seed=10)
    x = x.numpy()[:, 0] if views == 1 else x.numpy()
    selected = []
    original = ghost.select_layers
    monkeypatch.setattr(
        ghost, "select_layers", lambda *args: selected.extend(original(*args)) or selected
    )
    dp = dict(l2_norm_clip=0.01, noise_multiplier=0.0, expected_batch_size=6, dataset_size=60)
    results = updates_by_clipping_mode(
        base, x, y.numpy(), ("ghost", "vectorized"), augmult=views, **dp
    )
    assert base.get_layer("embedding").name in [layer.name for layer in selected]
    np.testing.assert_allclose(results["ghost"], results["vectorized"], atol=1e-6)
    assert not np.allclose(results["ghost"], flat(base.get_weights()))
