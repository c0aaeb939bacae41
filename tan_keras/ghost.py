"""Ghost clipping for the layers where it is cheaper than per-example gradients.

For a Dense or Conv2D kernel, example i's gradient is a sum over its rows s
(output positions, times its K views) of outer products,

  dW_i = sum_s p_is (x) g_is = P_i^T G_i,

with p_is the input row (for a convolution: the receptive field, unfolded)
and g_is the gradient of the loss with respect to the pre-activation output.
Its squared norm needs no dW_i (Goodfellow 2015, Li et al. 2022):

  ||dW_i||^2 = sum_{s,t} (p_is . p_it) (g_is . g_it) = <P_i P_i^T, G_i G_i^T>,

at a cost of rows^2 * (p + o) per example against rows * p * o for forming
dW_i. Once every example's clip factor is known, the clipped sum over
examples is ONE batched weight gradient with each example's g rows scaled
by its factor -- what a non-private step computes anyway. So a layer with
few output positions and many weights (WideResNet-16-4's 8x8 stage: 64
positions, 2304 x 256 weights) never has its per-example gradients formed.
Layers with many positions (the 32x32 stage) keep the per-example path.
"""

from typing import List, NamedTuple, Optional, Sequence, Tuple

import tensorflow as tf

_DENSE = tf.keras.layers.Dense
_CONV = tf.keras.layers.Conv2D


def _rule(layer) -> Optional[str]:
    """ "dense" or "conv" when `layer`'s kernel has a ghost rule, else None."""
    # Exact types: subclasses (WSConv2D...) may transform the kernel.
    if type(layer) is _DENSE:
        return "dense"
    if (
        type(layer) is _CONV
        and layer.data_format == "channels_last"
        and layer.groups == 1
        and layer.padding in ("valid", "same")
    ):
        return "conv"
    return None


def has_rule(layer: tf.keras.layers.Layer) -> bool:
    """Whether `layer`'s kernel can be clipped by ghost norm (whatever the cost).

    Args:
      layer: A Keras layer.

    Returns:
      True for a Dense, or a channels-last ungrouped Conv2D with "valid" or
      "same" padding (exact types, not subclasses).
    """
    return _rule(layer) is not None


def _output_positions(layer) -> Optional[int]:
    """Output positions of one call of `layer` on one view, if static."""
    try:
        shape = layer.output.shape
    except (AttributeError, ValueError):  # unbuilt, or called on several inputs
        return None
    positions = 1
    for dim in shape[1:-1]:
        if dim is None:
            return None
        positions *= int(dim)
    return positions


def is_cheaper(rows: int, fan_in: int, units: int) -> bool:
    """Whether the ghost norm costs fewer multiply-adds than forming dW_i.

    Args:
      rows: Rows per example (output positions x K views).
      fan_in: Length p of an input row (kh * kw * input channels for a conv).
      units: Output channels o.

    Returns:
      True when rows^2 * (p + o) < rows * p * o.
    """
    return rows * (fan_in + units) < fan_in * units


def select_layers(model: tf.keras.Model, augmult: int) -> List[tf.keras.layers.Layer]:
    """The layers of `model` whose kernels are clipped by ghost norm.

    A layer qualifies when its kernel is trainable, it is a Dense or a
    channels-last, ungrouped Conv2D with "valid" or "same" padding, its output
    shape is static, and `is_cheaper` holds for its rows per example.

    Args:
      model: A built Keras model.
      augmult: K, the views per example (they multiply the rows).

    Returns:
      The qualifying layers (possibly none).
    """
    trainable = {id(v) for v in model.trainable_variables}
    chosen = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        rule = _rule(layer)
        if rule is None or id(getattr(layer, "kernel", None)) not in trainable:
            continue
        positions = _output_positions(layer)
        if positions is None:
            continue
        fan_in = 1
        for dim in layer.kernel.shape[:-1]:
            fan_in *= int(dim)
        if is_cheaper(augmult * positions, fan_in, int(layer.kernel.shape[-1])):
            chosen.append(layer)
    return chosen


def _merge_views(t: tf.Tensor) -> tf.Tensor:
    """[batch, K, ...] -> [batch * K, ...] as float32."""
    return tf.cast(tf.reshape(t, tf.concat([[-1], tf.shape(t)[2:]], 0)), tf.float32)


def _per_example_rows(t: tf.Tensor, batch) -> tf.Tensor:
    """[batch * K, ..., C] -> [batch, K * positions, C]."""
    return tf.reshape(t, [batch, -1, t.shape[-1]])


def _patches(layer, a: tf.Tensor) -> tf.Tensor:
    """[n, H', W', kh * kw * C]: each output position's receptive field."""
    kh, kw = layer.kernel_size
    sh, sw = layer.strides
    dh, dw = layer.dilation_rate
    return tf.image.extract_patches(
        a,
        sizes=[1, kh, kw, 1],
        strides=[1, sh, sw, 1],
        rates=[1, dh, dw, 1],
        padding=layer.padding.upper(),
    )


def _padding(size: int, out: int, kernel: int, stride: int, dilation: int, same: bool):
    """(before, after) zero padding of one spatial axis, as TF convolutions pad."""
    if not same:
        return 0, 0
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _shifted_gram_is_cheaper(layer, inputs: tf.Tensor) -> bool:
    """Whether `_shifted_gram` costs fewer multiply-adds than unfolded patches."""
    if _rule(layer) != "conv" or None in inputs.shape[1:]:
        return False
    (out_h, out_w), (kh, kw) = layer.output.shape[1:3], layer.kernel_size
    padded = 1
    for axis, (size, out) in enumerate(zip(inputs.shape[2:4], (out_h, out_w))):
        before, after = _padding(
            size,
            out,
            layer.kernel_size[axis],
            layer.strides[axis],
            layer.dilation_rate[axis],
            layer.padding == "same",
        )
        padded *= size + before + after
    # (K * padded)^2 * C against (K * positions)^2 * kh * kw * C.
    return padded**2 < (out_h * out_w) ** 2 * kh * kw


def _shifted_gram(layer, inputs: tf.Tensor) -> tf.Tensor:
    """P_i P_i^T of a convolution without unfolding its patches.

    Row t of P_i is the receptive field of output position t, so
    (P P^T)[t, s] = sum over kernel offsets o of <x[t + o], x[s + o]>: a sum of
    kh * kw strided windows of the Gram matrix of the zero-padded input,
    which is (kh * kw) times smaller than the patches when the stride is 1.

    Args:
      layer: A Conv2D with `_shifted_gram_is_cheaper`.
      inputs: [batch, K, H, W, C] with static K, H, W, C.

    Returns:
      [batch, K * H' * W', K * H' * W'].
    """
    views, height, width, channels = inputs.shape[1:]
    out_h, out_w = layer.output.shape[1:3]
    pads = [
        _padding(size, out, kernel, stride, dilation, layer.padding == "same")
        for size, out, kernel, stride, dilation in zip(
            (height, width), (out_h, out_w), layer.kernel_size, layer.strides, layer.dilation_rate
        )
    ]
    padded = tf.pad(_merge_views(inputs), [[0, 0], pads[0], pads[1], [0, 0]])
    ph, pw = height + sum(pads[0]), width + sum(pads[1])
    rows = tf.reshape(padded, [-1, views * ph * pw, channels])
    gram = tf.reshape(tf.matmul(rows, rows, transpose_b=True), [-1, views, ph, pw, views, ph, pw])
    (sh, sw), (dh, dw) = layer.strides, layer.dilation_rate
    windows = []
    for i in range(layer.kernel_size[0]):
        for j in range(layer.kernel_size[1]):
            rows_h = slice(i * dh, i * dh + (out_h - 1) * sh + 1, sh)
            rows_w = slice(j * dw, j * dw + (out_w - 1) * sw + 1, sw)
            windows.append(gram[:, :, rows_h, rows_w, :, rows_h, rows_w])
    size = views * out_h * out_w
    return tf.reshape(tf.add_n(windows), [-1, size, size])


def _unit_scaled(tensors: Sequence[tf.Tensor]) -> Tuple[tf.Tensor, List[tf.Tensor]]:
    """(scale, tensors / scale): per example, scale = max |entry| over all calls.

    A zero example keeps scale 1 in the division (and reports 0); an Inf
    entry becomes Inf / Inf = NaN, as in clipping.py, so the norm is NaN.
    """
    batch = tf.shape(tensors[0])[0]
    per_call = [tf.abs(tf.reshape(tf.cast(t, tf.float32), [batch, -1])) for t in tensors]
    scale = tf.reduce_max(tf.stack([tf.reduce_max(t, axis=1) for t in per_call]), axis=0)
    safe = tf.where(scale > 0, scale, tf.ones_like(scale))
    scaled = [
        tf.cast(t, tf.float32) / tf.reshape(safe, [-1] + [1] * (t.shape.rank - 1)) for t in tensors
    ]
    return scale, scaled


class GhostGradient(NamedTuple):
    """A kernel's per-example gradients, held as inputs and output gradients.

    Stands in for the `[batch, *kernel_shape]` tensor in a list of
    per-example gradients; `clipping.clip_and_sum` asks it for norms and for
    the clipped sum instead of forming it.

    Attributes:
      layer: The Dense or Conv2D layer (see `select_layers`).
      inputs: One `[batch, K, *input_shape]` tensor per call of the layer.
      output_grads: One `[batch, K, *output_shape]` tensor per call: the
        gradient of each example's loss with respect to the pre-activation
        output.
    """

    layer: tf.keras.layers.Layer
    inputs: Tuple[tf.Tensor, ...]
    output_grads: Tuple[tf.Tensor, ...]

    def _input_gram(self, inputs: Sequence[tf.Tensor], batch) -> tf.Tensor:
        """[batch, rows, rows]: inner products of the input rows P_i P_i^T."""
        if len(inputs) == 1 and _shifted_gram_is_cheaper(self.layer, inputs[0]):
            return _shifted_gram(self.layer, inputs[0])
        rows = []
        for a in inputs:
            a = _merge_views(a)
            if _rule(self.layer) == "conv":
                a = _patches(self.layer, a)
            rows.append(_per_example_rows(a, batch))
        rows = tf.concat(rows, axis=1)
        return tf.matmul(rows, rows, transpose_b=True)

    def _squared_norms(self, inputs, output_grads) -> tf.Tensor:
        batch = tf.shape(inputs[0])[0]
        g = tf.concat([_per_example_rows(_merge_views(t), batch) for t in output_grads], 1)
        inner = self._input_gram(inputs, batch) * tf.matmul(g, g, transpose_b=True)
        # The sum is a squared norm; rounding must not make it negative.
        return tf.maximum(tf.reduce_sum(inner, axis=[1, 2]), 0.0)

    def squared_norms(self) -> tf.Tensor:
        """[batch] squared L2 norms of the per-example kernel gradients.

        NaN or Inf for an example with a non-finite input or output gradient;
        may overflow for huge finite values (see `rescaled_norms`).
        """
        return self._squared_norms(self.inputs, self.output_grads)

    def rescaled_norms(self) -> tf.Tensor:
        """[batch] norms computed on inputs and output gradients scaled to max |entry| 1.

        Finite for any finite gradient whose norm fits in float32, NaN for an
        example with a non-finite entry.
        """
        a_scale, inputs = _unit_scaled(self.inputs)
        g_scale, output_grads = _unit_scaled(self.output_grads)
        return a_scale * tf.sqrt(self._squared_norms(inputs, output_grads)) * g_scale

    def clipped_sum(self, keep: tf.Tensor, denom: tf.Tensor, clip: tf.Tensor) -> tf.Tensor:
        """sum_i [keep_i] dW_i * clip / denom_i, as one batched weight gradient.

        Args:
          keep: [batch] bool; dropped examples contribute exactly 0 (their
            rows are selected away, since 0 * NaN = NaN).
          denom: [batch] max(norm_i, clip), > 0.
          clip: Scalar C.

        Returns:
          A float32 tensor of the kernel's shape.
        """
        total = None
        for a, g in zip(self.inputs, self.output_grads):
            shape = [-1] + [1] * (g.shape.rank - 1)
            rows_kept = tf.reshape(keep, shape)
            a = tf.where(tf.reshape(keep, [-1] + [1] * (a.shape.rank - 1)), a, tf.zeros_like(a))
            # Divide before multiplying by C: C / a huge norm can underflow.
            g = tf.cast(g, tf.float32) / tf.reshape(denom, shape)
            g = tf.where(rows_kept, g, tf.zeros_like(g)) * clip
            grad = self._weight_gradient(_merge_views(a), _merge_views(g))
            total = grad if total is None else total + grad
        return total

    def _weight_gradient(self, a: tf.Tensor, g: tf.Tensor) -> tf.Tensor:
        """The kernel gradient of the layer's output for output gradient g."""
        if _rule(self.layer) == "dense":
            a = tf.reshape(a, [-1, a.shape[-1]])
            g = tf.reshape(g, [-1, g.shape[-1]])
            return tf.matmul(a, g, transpose_a=True)
        kernel = tf.cast(self.layer.kernel, tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(kernel)
            # Only the filter gradient is used; the forward op is pruned in a
            # tf.function.
            out = self.layer.convolution_op(a, kernel)
        return tape.gradient(out, kernel, output_gradients=g)


def split(
    per_example_grads: Sequence[object],
) -> Tuple[List[Tuple[int, tf.Tensor]], List[Tuple[int, GhostGradient]]]:
    """Separates formed per-example gradients from `GhostGradient`s.

    Args:
      per_example_grads: One entry per variable: a tensor or a GhostGradient.

    Returns:
      ([(index, tensor)], [(index, ghost)]) in the order of the input.
    """
    formed, ghosts = [], []
    for index, grad in enumerate(per_example_grads):
        (ghosts if isinstance(grad, GhostGradient) else formed).append((index, grad))
    return formed, ghosts
