"""Fast per-example gradients from layer activations and output gradients.

`tf.vectorized_map` has no vectorized rule for `Conv2DBackpropFilter`, so the
generic path (per_example.py) runs conv nets' weight gradients in a while
loop. Here one batched forward and one batched backward pass give, for every
supported layer, its inputs `a` and the gradient `g` of the summed loss with
respect to its pre-activation output; each example's weight gradient is then
a contraction over that example's rows only:

  Dense:   dW_i = sum_s a_is (x) g_is             (s: positions, K views)
  Conv2D:  dW_i = sum_s patches(a)_is (x) g_is    (patches: the receptive fields)
  bias:    db_i = sum_s g_is
  GroupNormalization / LayerNormalization (last axis):
           dgamma_i = sum_s g_is * xhat_is,  dbeta_i = sum_s g_is
  Conv2D subclasses registered with `register_reparametrized_conv` (the
           weight-standardized WSConv2D): the Conv2D rule on the effective
           kernel, pulled back through its (data-independent) map per example.

This is exact, not an approximation: the loss is a sum over examples (each
example's loss computed from its own K views alone, whatever the loss
function does with the batch it is given) and no supported layer mixes
examples (BatchNorm is refused), so row i of `g` is the gradient of example
i's loss alone. The K views of an example are extra
positions s of the same example, so their gradients are summed (the loss
already averages over views) before clipping.

The batched pass is what makes this exact only under two conditions, both
checked before the route is taken (`unsupported_reason`): no op mixes the
examples of the batch (every layer is of an allow-listed per-example type,
and a gradient probe finds no dependence of one example's output on
another's input), and every variable is used only by the calls of the layer
that owns it (no tied weights: a rule sees its own layer's use only). A
model outside these rules (Embedding, depthwise or grouped convolutions,
custom layers, Lambdas, tied weights) uses the generic path.
"""

from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import keras
import tensorflow as tf

from tan_keras import _keras_internals
from tan_keras.mechanism import model_analysis, tapping

_DENSE = keras.layers.Dense
_CONV = keras.layers.Conv2D
_GROUP_NORM = keras.layers.GroupNormalization
_LAYER_NORM = keras.layers.LayerNormalization

# Conv2D subclasses whose kernel is a function of their weights (e.g. the
# weight-standardized conv of tan_keras.models): type -> ReparametrizedConv.
_REPARAMETRIZED_CONVS: Dict[type, "ReparametrizedConv"] = {}


class ReparametrizedConv(NamedTuple):
    """How a Conv2D subclass computes its kernel from its weights.

    Attributes:
      weights: layer -> the trainable variables the kernel is computed from.
      effective_kernel: layer -> the kernel the convolution uses; a function
        of `weights` alone (nothing of the batch), so each example's kernel
        gradient pulls back through the same linear map.
    """

    weights: Callable[[keras.layers.Layer], List[keras.Variable]]
    effective_kernel: Callable[[keras.layers.Layer], tf.Tensor]


def register_reparametrized_conv(layer_type: type, rule: ReparametrizedConv) -> None:
    """Lets the layerwise route (and only it) accept `layer_type`.

    Its per-example gradients are the Conv2D rule's on the effective kernel,
    pulled back through `rule.effective_kernel` to `rule.weights`.

    Args:
      layer_type: An exact subclass of `keras.layers.Conv2D`.
      rule: Its `ReparametrizedConv`.

    Raises:
      TypeError: if `layer_type` is not a strict Conv2D subclass or `rule` is
        not a `ReparametrizedConv`.
    """
    if not (
        isinstance(layer_type, type) and issubclass(layer_type, _CONV) and layer_type is not _CONV
    ):
        raise TypeError(f"layer_type must be a subclass of keras.layers.Conv2D, got {layer_type!r}")
    if not isinstance(rule, ReparametrizedConv):
        raise TypeError(f"rule must be a ReparametrizedConv, got {type(rule).__name__}")
    _REPARAMETRIZED_CONVS[layer_type] = rule
    model_analysis.register_per_example_layer_type(layer_type)


def _supported(layer) -> bool:
    if not layer.trainable_weights:
        return False
    if type(layer) is _DENSE:
        return True
    if type(layer) is _CONV or type(layer) in _REPARAMETRIZED_CONVS:
        return (
            layer.data_format == "channels_last"
            and layer.groups == 1
            and layer.padding in ("valid", "same")
        )
    if type(layer) is _GROUP_NORM:
        return layer.axis in (-1, 3)
    if type(layer) is _LAYER_NORM:
        return _last_axis(layer)
    return False


def _last_axis(layer) -> bool:
    try:
        rank = len(layer.input.shape)
    except (AttributeError, ValueError):  # unbuilt, or shared (several inputs)
        return False
    return rank is not None and [a % rank for a in layer.axis] == [rank - 1]


def _supported_layers(model) -> List[keras.layers.Layer]:
    return [layer for layer in _keras_internals.all_layers(model) if _supported(layer)]


def supports(model: keras.Model, augmult: Optional[int] = None) -> bool:
    """Whether `per_example_gradients` is exact and private for `model`.

    Args:
      model: A Keras model.
      augmult: K, the views per example; default: the model's
        `dp_config.augmult` if it has one, else 1.

    Returns:
      True if `unsupported_reason` finds nothing.
    """
    return unsupported_reason(model, augmult) is None


def unsupported_reason(model: keras.Model, augmult: Optional[int] = None) -> Optional[str]:
    """Why the layerwise route would be wrong or leak for `model`, or None.

    Checked in this order (the cross-example probe runs the model, so last):
    every trainable variable has a layerwise rule; no trainable variable is
    used outside its owning layer's calls (`model_analysis.tied_variables`:
    the rules only count those calls); one batched pass does not mix examples
    (`model_analysis.cross_example_reason`: allow-listed layer types and a
    gradient probe).

    Args:
      model: A Keras model.
      augmult: K; default as in `supports`.

    Returns:
      None, or a sentence naming the variable or layer at fault.
    """
    covered = set()
    for layer in _keras_internals.all_layers(model):
        if _supported(layer):
            covered.update(id(v) for v in layer.trainable_weights)
    for variable in model.trainable_variables:
        if id(variable) not in covered:
            return (
                f"trainable variable `{variable.name}` has no layerwise rule (supported: "
                "Dense, Conv2D, GroupNormalization, LayerNormalization and registered "
                f"Conv2D subclasses: {sorted(c.__name__ for c in _REPARAMETRIZED_CONVS)})"
            )
    ties = model_analysis.tied_variables(model)
    for variable in model.trainable_variables:
        if id(variable) in ties:
            return (
                f"{ties[id(variable)].describe()}: the layerwise rules only count the calls "
                "of the layer that owns a variable"
            )
    if augmult is None:
        config = getattr(model, "dp_config", None)
        augmult = config.augmult if config is not None else 1
    return model_analysis.cross_example_reason(model, augmult)


def _per_example(t: tf.Tensor, batch: int) -> tf.Tensor:
    """[B*K, ..., C] -> [B, K*positions, C]: an example's rows together."""
    return tf.reshape(t, [batch, -1, t.shape[-1]])


def _dense_grads(layer, a, g, batch) -> Dict[int, tf.Tensor]:
    a, g = _per_example(a, batch), _per_example(g, batch)
    grads = {id(layer.kernel): tf.einsum("bsi,bso->bio", a, g)}
    if layer.use_bias:
        grads[id(layer.bias)] = tf.reduce_sum(g, axis=1)
    return grads


def _conv_grads(layer, a, g, batch) -> Dict[int, tf.Tensor]:
    kh, kw = layer.kernel_size
    sh, sw = layer.strides
    dh, dw = layer.dilation_rate
    patches = tf.image.extract_patches(
        a,
        sizes=[1, kh, kw, 1],
        strides=[1, sh, sw, 1],
        rates=[1, dh, dw, 1],
        padding=layer.padding.upper(),
    )
    patches, g = _per_example(patches, batch), _per_example(g, batch)
    kernel_grad = tf.einsum("bsp,bso->bpo", patches, g)
    kernel_grad = tf.reshape(kernel_grad, [batch] + list(layer.kernel.shape))
    grads = {}
    rule = _REPARAMETRIZED_CONVS.get(type(layer))
    if rule is not None:
        grads.update(_pullback(layer, rule, kernel_grad))
    else:
        grads[id(layer.kernel)] = kernel_grad
    if layer.use_bias:
        grads[id(layer.bias)] = tf.reduce_sum(g, axis=1)
    return grads


def _pullback(layer, rule: ReparametrizedConv, effective_grads) -> Dict[int, tf.Tensor]:
    # The effective kernel depends on the weights only, so each example's
    # gradient is pulled back through the same (linear) vector-Jacobian map.
    variables = list(rule.weights(layer))

    def pullback(cotangent):
        # The TensorFlow variables under the Keras ones are what a tape watches.
        weights = [v.value for v in variables]
        with tf.GradientTape() as tape:
            tape.watch(weights)
            effective = rule.effective_kernel(layer)
        return tape.gradient(effective, weights, output_gradients=cotangent)

    grads = tf.vectorized_map(pullback, effective_grads)
    return {id(v): g for v, g in zip(variables, grads)}


def _normalized(layer, a) -> tf.Tensor:
    """The layer's normalized input xhat, recomputed as the layer does."""
    if isinstance(layer, _GROUP_NORM):
        channels = a.shape[-1]
        grouped = tf.reshape(
            a, tf.concat([tf.shape(a)[:-1], [layer.groups, channels // layer.groups]], 0)
        )
        axes = list(range(1, grouped.shape.rank - 2)) + [grouped.shape.rank - 1]
        mean, var = tf.nn.moments(grouped, axes=axes, keepdims=True)
        xhat = (grouped - mean) * tf.math.rsqrt(var + layer.epsilon)
        return tf.reshape(xhat, tf.shape(a))
    mean, var = tf.nn.moments(a, axes=[a.shape.rank - 1], keepdims=True)
    return (a - mean) * tf.math.rsqrt(var + layer.epsilon)


def _norm_grads(layer, a, g, batch) -> Dict[int, tf.Tensor]:
    grads = {}
    g_rows = _per_example(g, batch)
    if layer.scale:
        xhat = _per_example(_normalized(layer, a), batch)
        grads[id(layer.gamma)] = tf.reduce_sum(g_rows * xhat, axis=1)
    if layer.center:
        grads[id(layer.beta)] = tf.reduce_sum(g_rows, axis=1)
    return grads


def _layer_grads(layer, a, g, batch) -> Dict[int, tf.Tensor]:
    a = tf.cast(a, tf.float32)
    g = tf.cast(g, tf.float32)
    if isinstance(layer, _DENSE):
        return _dense_grads(layer, a, g, batch)
    if isinstance(layer, _CONV):
        return _conv_grads(layer, a, g, batch)
    return _norm_grads(layer, a, g, batch)


def _per_example_losses(loss_fn, y, pred, batch, num_views) -> tf.Tensor:
    """[batch] view-averaged losses, the loss function called on one example at a time.

    The model's pass is batched (its layers are checked to keep examples
    apart), but the loss is the user's: one that centers predictions on the
    batch mean, or contrasts the examples of a batch, would carry each
    example's data into the others' gradients. Called on one example's K
    views only (`tf.vectorized_map`, exact), it cannot.
    """

    def grouped(p):
        return tf.reshape(p, tf.concat([[batch, num_views], tf.shape(p)[1:]], 0))

    def one_example(args):
        label, prediction = args
        labels = tf.nest.map_structure(
            lambda t: tf.repeat(tf.expand_dims(t, 0), num_views, axis=0), label
        )
        return tf.reduce_mean(loss_fn(labels, prediction))

    return tf.vectorized_map(one_example, (y, tf.nest.map_structure(grouped, pred)))


def per_example_gradients(
    model: keras.Model,
    loss_fn: Callable[[tf.Tensor, tf.Tensor], tf.Tensor],
    views: tf.Tensor,
    y: tf.Tensor,
    example_weights: Optional[tf.Tensor] = None,
) -> Optional[Tuple[List[tf.Tensor], tf.Tensor, tf.Tensor]]:
    """Per-example gradients of view-averaged losses, layer by layer.

    Same contract as `per_example.per_example_gradients`.

    Args:
      model: The Keras model; every trainable variable needs a rule
        (`supports(model)`).
      loss_fn: Unreduced loss, `(y_true, y_pred) -> [rows]`.
      views: [batch, K, *input_shape] inputs (or a list or dict of them).
      y: [batch, ...] labels, one per example (or a list, one per output).
      example_weights: Optional [batch] weights of each example's loss.

    Returns:
      (grads, losses, predictions) as in `per_example.per_example_gradients`.

    Raises:
      ValueError: if the model has a trainable variable without a rule.
    """
    first = tf.nest.flatten(views)[0]
    batch = first.shape[0] if first.shape[0] is not None else tf.shape(first)[0]
    num_views = first.shape[1]
    rows = tf.nest.map_structure(
        lambda v: tf.reshape(v, tf.concat([[-1], tf.shape(v)[2:]], 0)), views
    )
    taps: List[tapping.Tap] = []
    with tf.GradientTape() as tape, tapping.recording(_supported_layers(model), taps):
        pred = model(rows, training=True)
        losses = _per_example_losses(loss_fn, y, pred, batch, num_views)
        if example_weights is not None:
            losses = losses * tf.cast(example_weights, losses.dtype)
        total = tf.reduce_sum(losses)
    out_grads = tape.gradient(total, [z for _, _, z in taps])
    per_var: Dict[int, tf.Tensor] = {}
    for (layer, a, z), g in zip(taps, out_grads):
        if g is None:  # the layer does not reach the loss
            g = tf.zeros_like(z)
        for key, grad in _layer_grads(layer, a, g, batch).items():
            # A layer called several times (shared weights) sums its calls.
            per_var[key] = per_var[key] + grad if key in per_var else grad
    grads = []
    for variable in model.trainable_variables:
        if id(variable) not in per_var:
            raise ValueError(
                f"No layerwise per-example gradient rule covers variable {variable.name}; "
                "use clipping='vectorized'."
            )
        grads.append(per_var[id(variable)])
    preds = tf.nest.map_structure(
        lambda p: tf.reduce_mean(
            tf.reshape(p, tf.concat([[batch, num_views], tf.shape(p)[1:]], 0)), axis=1
        ),
        pred,
    )
    return grads, losses, preds
