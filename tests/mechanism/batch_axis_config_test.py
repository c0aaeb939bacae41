"""Allowed layers configured to act over the batch axis are refused statically.

Attack (issue 24, review escape a04): `Softmax(axis=0)`, an allow-listed
type, behind a ReLU whose threshold the gradient probe's random inputs never
reach. The probe saw a zero gradient and passed the model; on real data one
added example moved the noiseless update on the layerwise route (and with
clipping="auto" under XLA) by 8.8 lr*C/B. Now every argument of an allowed
layer that names axes is normalised against the rank of the layer's input
and checked not to include the batch axis (0, or -rank), whatever the data
(`model_analysis.batch_axis_reason`); the probe stays as a second line.
Power checks: the probe alone returns None for the gated model (and for a
custom activation mixing the rows behind stop_gradient); with the static
check patched away the model is accepted; the batched pass over the gated
model moves the clipped sum by more than 3 C.
"""

import inspect
import re
from typing import Any, Callable, NamedTuple

import keras
import numpy as np
import pytest
import tensorflow as tf
from _helpers import LOSS, flat, one_step

import tan_keras
from tan_keras.keras_dp.dp_model import DPKerasModel
from tan_keras.mechanism import clipping, layerwise, model_analysis, per_example

layers = keras.layers
LOSS_FN = per_example.unreduced_loss_fn(LOSS)
LR, CLIP, BATCH = 0.5, 0.1, 8
DP = dict(l2_norm_clip=CLIP, noise_multiplier=0.0, expected_batch_size=BATCH, dataset_size=40)


def _gated_batch_softmax():
    """Softmax over the batch behind a gate that the probe's N(0, 1) inputs never open.

    The logits kernel is scaled up so that the rows' softmax weights decide
    each example's prediction (the attack's amplifier).
    """
    keras.utils.set_random_seed(1)
    inp = keras.Input((4,))
    h = layers.Dense(8, name="hidden")(inp)
    h = layers.ReLU(threshold=20.0, name="gate")(h)
    h = layers.Softmax(axis=0, name="batch_softmax")(h)
    logits = layers.Dense(3, name="logits")
    model = keras.Model(inp, logits(h))
    logits.kernel.assign(logits.kernel * 40.0)
    return model


def _neighbouring_batches(copies=BATCH):
    """D: copies of one example far enough out to open the gate; D plus z, 3x farther."""
    x = np.tile(np.random.default_rng(0).normal(size=(1, 4)).astype(np.float32) * 50, (copies, 1))
    y = np.full(copies, 2, np.int32)
    return (x, y), (np.concatenate([x, 3 * x[:1]]), np.full(copies + 1, 2, np.int32))


def _clipped_sum(model, per_example_gradients, x, y):
    grads = per_example_gradients(model, LOSS_FN, tf.constant(x[:, None]), tf.constant(y))[0]
    return flat(clipping.clip_and_sum(grads, CLIP, tf.ones([len(x)])).grad_sum)


def test_a_gated_batch_softmax_passes_the_probe_but_is_refused_statically(monkeypatch):
    # Power check: the gradient probe alone accepts it (zero gradient behind the gate).
    assert model_analysis._probe(_gated_batch_softmax(), 1) is None
    reason = model_analysis.cross_example_reason(_gated_batch_softmax())
    assert "`batch_softmax` (Softmax) has axis=0" in reason
    assert "includes the batch axis" in reason
    with pytest.raises(
        ValueError, match="`clipping`.*batch_softmax.*axis=0.*clipping='vectorized'"
    ):
        tan_keras.make_private(_gated_batch_softmax(), clipping="layerwise", **DP)
    base = _gated_batch_softmax()
    with pytest.raises(ValueError, match="`clipping`.*batch_softmax.*axis=0"):
        DPKerasModel(base.inputs, base.outputs, clipping="layerwise", **DP)
    # ... and without the static check, nothing else refuses it.
    monkeypatch.setattr(model_analysis, "batch_axis_reason", lambda layer: None)
    assert model_analysis.cross_example_reason(_gated_batch_softmax()) is None


# Run one example at a time, the softmax over axis 0 has one row: Keras warns.
@pytest.mark.filterwarnings("ignore:You are using a softmax over axis 0")
def test_auto_keeps_the_gated_batch_softmax_off_the_batched_route():
    (x, y), (xz, yz) = _neighbouring_batches()
    # Power check: on the batched pass, adding z moves the others' clipped
    # gradients (measured 7.2 C; one example may move the sum by C).
    model = _gated_batch_softmax()
    moved = _clipped_sum(model, layerwise.per_example_gradients, xz, yz) - _clipped_sum(
        model, layerwise.per_example_gradients, x, y
    )
    assert np.linalg.norm(moved) > 3 * CLIP
    # "auto" under XLA (which picks layerwise where it may) now takes another
    # route, decided at compile; that route's update respects lr * C / B
    # (stepped without XLA, which changes no arithmetic that matters here
    # and compiles in a fraction of the time).
    base = _gated_batch_softmax()
    model = DPKerasModel(base.inputs, base.outputs, clipping="auto", **DP)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss=LOSS, jit_compile=True)
    route = model.clipping
    assert route != "layerwise"
    weights = []
    for xs, ys in ((x, y), (xz, yz)):
        base = _gated_batch_softmax()
        model = DPKerasModel(base.inputs, base.outputs, clipping=route, **DP)
        model.compile(optimizer=keras.optimizers.SGD(LR), loss=LOSS)
        weights.append(flat(one_step(model, xs, ys)))
    assert np.linalg.norm(weights[1] - weights[0]) <= LR * CLIP / BATCH * (1 + 1e-4)


class Case(NamedTuple):
    """An axis-configurable allowed layer, on rank-3 inputs (None, 3, 4)."""

    id: str
    layer_type: type
    attribute: str
    fixed: dict  # other constructor arguments
    two_inputs: bool
    default: Any  # the value of `attribute` for the default test (None: left out)
    other: Any  # a value naming no batch axis
    batch: Callable  # batch axis (0 or -3) -> the value of `attribute`
    # Whether the batch value is set on the built layer (Keras refuses it at
    # construction, build or call: a weight of unknown size, a check in
    # __init__ or in batch_dot); `call` reads the attribute, so that is a
    # configuration too.
    set_after: bool = False


NO_WEIGHTS = dict(center=False, scale=False)
AXIS_LAYERS = [
    Case("softmax", layers.Softmax, "axis", {}, False, None, 1, lambda v: v),
    Case("softmax_list", layers.Softmax, "axis", {}, False, None, [1, 2], lambda v: [1, v]),
    Case("layer_norm", layers.LayerNormalization, "axis", NO_WEIGHTS, False, None, -2, lambda v: v),
    Case(
        "layer_norm_weights",
        layers.LayerNormalization,
        "axis",
        {},
        False,
        None,
        [1, 2],
        lambda v: [v, -1],
        set_after=True,
    ),
    Case("unit_norm", layers.UnitNormalization, "axis", {}, False, None, 1, lambda v: v),
    Case("unit_norm_list", layers.UnitNormalization, "axis", {}, False, None, 1, lambda v: [-1, v]),
    Case(
        "group_norm",
        layers.GroupNormalization,
        "axis",
        dict(groups=2),
        False,
        None,
        -1,
        lambda v: v,
        set_after=True,
    ),
    Case("concatenate", layers.Concatenate, "axis", {}, True, None, 1, lambda v: v),
    Case("dot", layers.Dot, "axes", {}, True, -1, 1, lambda v: v, set_after=True),
    Case(
        "dot_pair", layers.Dot, "axes", {}, True, (2, 2), (1, 1), lambda v: (2, v), set_after=True
    ),
    Case(
        "permute",
        layers.Permute,
        "dims",
        {},
        False,
        (2, 1),
        (1, 2),
        lambda v: (v, 1),
        set_after=True,
    ),
]
CASE_IDS = [case.id for case in AXIS_LAYERS]


def _axis_model(case, value, set_after=None):
    """A model around `case`'s layer built with `attribute`=value (None: left out).

    With `set_after`, that value is then set on the built layer.
    """
    keras.utils.set_random_seed(0)
    arguments = dict(case.fixed)
    if value is not None:
        arguments[case.attribute] = value
    layer = case.layer_type(**arguments)
    inp = keras.Input((3, 4))
    h = layers.Dense(4, name="features")(inp)
    out = layer([h, h]) if case.two_inputs else layer(h)
    model = keras.Model(inp, layers.Dense(2, name="logits")(layers.Flatten()(out)))
    if set_after is not None:
        setattr(layer, case.attribute, set_after)
    return model, layer


@pytest.mark.parametrize("batch_axis", [0, -3], ids=["zero", "minus_rank"])
@pytest.mark.parametrize("case", AXIS_LAYERS, ids=CASE_IDS)
def test_an_axis_argument_naming_the_batch_axis_is_reported(case, batch_axis):
    value = case.batch(batch_axis)
    if case.set_after:
        model, layer = _axis_model(case, case.default, set_after=value)
    else:
        model, layer = _axis_model(case, value)
    reason = model_analysis.batch_axis_reason(layer)
    assert reason is not None
    assert f"`{layer.name}` ({type(layer).__name__}) has {case.attribute}=" in reason, reason
    assert "includes the batch axis" in reason and "rank-3 input" in reason, reason
    # Reported before the probe runs (the static check needs no data).
    assert model_analysis.cross_example_reason(model) == reason
    if not case.set_after:  # (a layer set after building may no longer run at all)
        assert not layerwise.supports(model)


@pytest.mark.parametrize("which", ["default", "other"])
@pytest.mark.parametrize("case", AXIS_LAYERS, ids=CASE_IDS)
def test_the_same_layers_on_other_axes_are_accepted(case, which):
    model, layer = _axis_model(case, case.default if which == "default" else case.other)
    assert model_analysis.batch_axis_reason(layer) is None
    assert model_analysis.cross_example_reason(model) is None


def _mixing_activation(x):
    """Centers by the batch mean behind stop_gradient: the probe cannot see it."""
    return x - keras.ops.stop_gradient(keras.ops.mean(x, axis=0, keepdims=True))


def _model(build, shape=(4,)):
    keras.utils.set_random_seed(0)
    inp = keras.Input(shape)
    return keras.Model(inp, build(inp))


@pytest.mark.parametrize(
    "build,shape,expected",
    [
        (lambda x: layers.Softmax(name="s")(x), (), "`s` \\(Softmax\\) has axis=-1.*rank-1 input"),
        (
            lambda x: layers.Activation("softmax", name="s")(x),
            (),
            "`s` \\(Activation\\) has activation='softmax'.*axis=-1.*rank-1 output",
        ),
        (
            lambda x: layers.Dense(3, activation=_mixing_activation, name="d")(x),
            (4,),
            "`d` \\(Dense\\) has activation=.*_mixing_activation.*not a built-in",
        ),
        (
            lambda x: layers.Rescaling(np.ones((2, 1, 4), np.float32), name="r")(x),
            (4,),
            "`r` \\(Rescaling\\) has a scale of rank 3.*batch axis",
        ),
    ],
    ids=["softmax_rank1", "activation_softmax_rank1", "custom_activation", "rescaling"],
)
def test_other_configurations_reaching_the_batch_axis_are_reported(build, shape, expected):
    reason = model_analysis.cross_example_reason(_model(build, shape))
    assert reason is not None and re.search(expected, reason), reason


def test_a_custom_activation_passes_the_probe_but_not_the_static_check():
    model = _model(lambda x: layers.Dense(3, activation=_mixing_activation, name="d")(x))
    assert model_analysis._probe(model, 1) is None  # power check
    assert "not a built-in Keras activation" in model_analysis.batch_axis_reason(model.layers[1])


@pytest.mark.parametrize(
    "build",
    [
        lambda x: layers.Activation("softmax")(layers.Dense(3)(x)),
        lambda x: layers.Dense(3, activation="softmax")(x),
        lambda x: layers.Dense(4, activation="glu")(x),
        lambda x: layers.Rescaling(np.full(4, 0.5, np.float32), offset=-1.0)(x),
        lambda x: layers.Rescaling(1 / 255)(x),
    ],
    ids=["activation_softmax", "dense_softmax", "dense_glu", "rescaling_channels", "rescaling"],
)
def test_ordinary_activations_and_rescaling_are_accepted(build):
    model = _model(build)
    assert all(model_analysis.batch_axis_reason(layer) is None for layer in model.layers)
    assert model_analysis.cross_example_reason(model) is None


def test_a_layer_never_called_cannot_be_checked():
    reason = model_analysis.batch_axis_reason(layers.Softmax())
    assert "rank of its input is unknown" in reason and "axis=-1" in reason


def test_every_allowed_type_with_an_axis_argument_is_checked_statically():
    # A type added to the allow-list with an axis-like constructor argument
    # must get a static check (PReLU's shared_axes only shapes its weight,
    # which spans the non-batch axes).
    axis_like = {"axis", "axes", "dims", "attention_axes", "shared_axes", "reduction_axes"}
    for name in model_analysis._PER_EXAMPLE_LAYER_NAMES:
        layer_type = getattr(layers, name, None)
        if layer_type is None:
            continue
        arguments = set(inspect.signature(layer_type.__init__).parameters) & axis_like
        if arguments:
            assert name in model_analysis._AXIS_ARGUMENTS or name == "PReLU", (name, arguments)
