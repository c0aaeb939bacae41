"""Ghost clipping equals clipping the formed per-example gradients."""

import numpy as np
import pytest
import tensorflow as tf
from _helpers import LOSS, flat, updates_by_clipping_mode
from layerwise_test import KINDS, _inputs, _model

from tan_keras import ghost, per_example
from tan_keras.clipping import clip_and_sum
from tan_keras.models import build_model
from tan_keras.models.wrn import wide_resnet

LOSS_FN = per_example.unreduced_loss_fn(LOSS)
layers = tf.keras.layers


def _ghostable(model):
    """Every layer with a ghost rule, cheaper or not: the widest test."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if ghost.has_rule(layer)
    ]


def _both(model, x, y, mask, clip, layers=None):
    layers = _ghostable(model) if layers is None else layers
    with_ghost = per_example.per_example_gradients(model, LOSS_FN, x, y, ghost_layers=layers)
    formed = per_example.per_example_gradients(model, LOSS_FN, x, y)
    return clip_and_sum(with_ghost[0], clip, mask), clip_and_sum(formed[0], clip, mask)


def _assert_same(got, want, atol=1e-5):
    for a, b in zip(got.grad_sum, want.grad_sum):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=atol)
    np.testing.assert_allclose(got.norms.numpy(), want.norms.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(got.kept.numpy(), want.kept.numpy())
    for name in ("num_clipped", "num_nonfinite", "num_examples"):
        assert float(getattr(got, name)) == float(getattr(want, name)), name


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch,views", [(1, 1), (5, 1), (3, 4)])
def test_clipped_sum_equals_the_formed_path(kind, batch, views):
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
    _assert_same(got, want)
    if batch > 1:
        assert 0 < float(want.num_clipped) < batch


def test_the_ghost_entries_really_stand_in_for_the_kernels():
    model = _model("conv_same_stride")
    x, y = _inputs(model, 3, 2, seed=0)
    grads, _, _ = per_example.per_example_gradients(
        model, LOSS_FN, x, y, ghost_layers=_ghostable(model)
    )
    kinds = [isinstance(g, ghost.GhostGradient) for g in grads]
    kernels = [v.name.endswith("kernel:0") for v in model.trainable_variables]
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
    _assert_same(got, want)
    assert all(np.all(np.isfinite(g.numpy())) for g in got.grad_sum)


def test_under_xla_and_in_chunks():
    from tan_keras import chunking

    model = _model("small_cnn")
    x, y = _inputs(model, 5, 2, seed=1)
    mask = tf.constant([1, 1, 1, 0, 1], tf.float32)
    layers = _ghostable(model)

    def run(size):
        return chunking.clip_in_chunks(
            lambda v, t: per_example.per_example_gradients(model, LOSS_FN, v, t, layers),
            model.trainable_variables,
            x,
            y,
            mask,
            0.1,
            size,
        )[0]

    want = clip_and_sum(per_example.per_example_gradients(model, LOSS_FN, x, y)[0], 0.1, mask)
    _assert_same(run(None), want)
    _assert_same(run(2), want)
    _assert_same(tf.function(lambda: run(2), jit_compile=True)(), want)


def _conv_model(size=8, **conv):
    tf.keras.utils.set_random_seed(6)
    inp = tf.keras.Input((size, size, 3))
    h = layers.Conv2D(4, 3, **conv)(inp)
    return tf.keras.Model(inp, layers.Dense(3)(layers.Flatten()(h)))


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
    _assert_same(got, want)


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
        _assert_same(got, want)


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
    tf.keras.utils.set_random_seed(0)
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
