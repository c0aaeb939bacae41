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

Rounding. <P P^T, G G^T> can cancel catastrophically: rows p and -p feeding
one output gradient (any pooling after the layer) have a small dW_i but
Gram terms of size ||p||^2 ||g||^2, and float32 returns junk, possibly 0.
A norm below the true one lets the example escape clipping, so the norm
used for clipping is a PROVABLE UPPER BOUND of ||P_i^T G_i||_F (exact
arithmetic on the float32 values the step uses; see `GhostGradient.norms`):

  1. P_i, G_i are divided by powers of two a, g (2^floor(log2 max|entry|)
     over all calls): exact, so no overflow and entries below 4; an entry
     flushed to zero (CPUs flush subnormals, on input and output) is off
     by eta <= 2^-126 max(1, 1/a) each, which moves the norm by at most
     c = 4 rows sqrt(p o) (eta_P + eta_G) (p, o: row lengths of P and G).
  2. Sums of n terms in any order (matmul, add_n, reduce_sum) err by at most
     gamma_n sum|terms|, gamma_n = n u / (1 - n u), u = 2^-24 (Higham,
     Accuracy and Stability, Thm 3.1/3.5), so with n_s = ||p_s||,
     m_s = ||g_s||: |A_st - p_s.p_t| <= gamma_p n_s n_t for A = fl(P P^T)
     (also for `_shifted_gram`: at most p terms per entry), likewise
     gamma_o m_s m_t for B = fl(G G^T); the rows^2 products A_st B_st are
     summed by a fixed pairwise tree (`_tree_sum`, depth log2 rows^2), so
     |computed - exact| <= k T^2 + E, T = sum_s n_s m_s, with
     k = 2 (gamma_p + gamma_o + gamma_depth) (2: a safety factor that
     covers the products of gammas) and E = rows^2 2^-126 (512 p o + 4)
     (every product and sum that may underflow, counted generously).
  3. n_s^2 <= (A_ss + 4 p 2^-126) / (1 - gamma_p), likewise m_s^2 (read from
     the diagonals, no extra matmul); T (inflated for its own rounding)
     bounds the norm too (triangle inequality). So the norm is at most
     a g (min(sqrt(max(computed, 0) + k T^2 + E), T) + c) (1 + 2^-20),
     the last factor covering the bound's own few roundings; times a g in
     two exact power-of-two steps, and at least 2^-126 (a result that
     small may have been flushed to zero).
  4. GPUs round matmul inputs to TensorFloat-32 when it is enabled (TF's
     default): gamma_p and gamma_o then carry 3 * 2^-11 more, which makes
     the bound looser (several percent on WideResNet, estimated);
     `tf.config.experimental.enable_tensor_float_32_execution(False)`
     restores float32's.

The bound is at least sqrt(k) T (about T / 60 for WideResNet's 8x8 stage,
T / 700 for tiny layers), which also caps an example's rows in the batched
weight gradient of `clipped_sum` at C / sqrt(k) in total: their rounding
there cannot wipe out the other examples' contributions. Measured on
WideResNet-16-4 (batch 16, K = 1): the bound is 0.5% above the true norm
(median; 0.8% at most) per ghost layer, 0.2% on the global norm.
"""

from typing import List, NamedTuple, Optional, Sequence, Tuple

import keras
import tensorflow as tf

from tan_keras import _keras_internals
from tan_keras.mechanism import model_analysis

_DENSE = keras.layers.Dense
_CONV = keras.layers.Conv2D


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


def has_rule(layer: keras.layers.Layer) -> bool:
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


def select_layers(model: keras.Model, augmult: int) -> List[keras.layers.Layer]:
    """The layers of `model` whose kernels are clipped by ghost norm.

    A layer qualifies when its kernel is trainable, it is a Dense or a
    channels-last, ungrouped Conv2D with "valid" or "same" padding, its output
    shape is static, `is_cheaper` holds for its rows per example, and its
    kernel is used by nothing but the layer's own calls (a tied kernel, e.g.
    read by a transposed decoder, also gets gradient from the other use,
    which the layer's taps do not see: it keeps the per-example path).

    Ops that mix the rows of a batch need no exclusion here: the ghost route
    runs inside `tf.vectorized_map`, where each example's K views go through
    the model alone, so such ops only mix an example's own views.

    Args:
      model: A built Keras model.
      augmult: K, the views per example (they multiply the rows).

    Returns:
      The qualifying layers (possibly none).
    """
    trainable = {id(v) for v in model.trainable_variables}
    chosen = []
    tied = None
    for layer in _keras_internals.all_layers(model):
        rule = _rule(layer)
        if rule is None or id(getattr(layer, "kernel", None)) not in trainable:
            continue
        if tied is None:  # traced once per model, only if some layer has a rule
            tied = model_analysis.tied_variables(model)
        if id(layer.kernel) in tied:
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


# float32 unit roundoff: one rounded operation errs by at most this, relatively.
_U = 2.0**-24
# Relative error of rounding a float32 to TensorFloat-32 (10 explicit mantissa
# bits), as GPU matmuls do to their inputs while TF32 execution is enabled.
_TF32_U = 2.0**-11
# Smallest normal float32: a smaller result or input may be flushed to zero.
_TINY = 2.0**-126


def _matmul_input_roundoff() -> float:
    """Relative error of a matmul input before its exact products (0, or TF32's)."""
    if not tf.config.experimental.tensor_float_32_execution_enabled():
        return 0.0
    # Decided when tracing; a visible GPU may run the matmuls: assume it does.
    return _TF32_U if tf.config.list_physical_devices("GPU") else 0.0


def _gamma(n) -> tf.Tensor:
    """Higham's gamma_n = n u / (1 - n u) for float32; inf when n u >= 1/2."""
    nu = tf.cast(n, tf.float32) * _U
    return tf.where(nu < 0.5, nu / (1.0 - nu), float("inf"))


def _tree_sum(x: tf.Tensor) -> Tuple[tf.Tensor, int]:
    """(sum over the last axis of [batch, n], depth): pairwise, in a fixed order.

    Each term goes through at most `depth` = ceil(log2 n) additions whatever
    the backend does (elementwise adds are not reassociated), against n - 1
    for a reduction in an unknown order. A dynamic n falls back to one
    reduce_sum, depth n.
    """
    n = x.shape[-1]
    if n is None:
        return tf.reduce_sum(x, axis=-1), tf.shape(x)[-1]
    depth = 0
    while n > 1:
        if n % 2:
            x = tf.pad(x, [[0, 0], [0, 1]])  # adding 0 is exact
            n += 1
        n //= 2
        x = x[:, :n] + x[:, n:]
        depth += 1
    return x[:, 0], depth


def _power_of_two(exponent: tf.Tensor) -> tf.Tensor:
    """2^exponent as float32, exactly, for int32 exponents in [-126, 127]."""
    return tf.bitcast(tf.bitwise.left_shift(exponent + 127, 23), tf.float32)


class _Scaled(NamedTuple):
    """Per-example power-of-two scaling of some tensors (see `_unit_scaled`)."""

    tensors: List[tf.Tensor]  # each divided by 2^exponent, exactly unless flushed
    exponent: tf.Tensor  # [batch] int32 in [-126, 126]
    flush: tf.Tensor  # [batch] per-entry error bound eta in scaled units
    zero: tf.Tensor  # [batch] bool: every entry is +-0
    nonfinite: tf.Tensor  # [batch] bool: some entry is NaN or Inf


def _unit_scaled(tensors: Sequence[tf.Tensor]) -> _Scaled:
    """Divides each example's entries (over all calls) by 2^floor(log2 max |entry|).

    Read from the bits, so that subnormals, Inf and NaN are seen exactly
    whatever the hardware flushes. Dividing by a power of two is exact, except
    that a result (or, on CPU, an input) below 2^-126 may be flushed to zero:
    an error below eta = 2^-126 max(1, 2^-exponent) per entry, in scaled
    units. Scaled entries are below 4 in magnitude (below 2 unless the maximum
    is at least 2^127, whose exponent is capped at 126 so that 2^-exponent is
    normal).
    """
    batch = tf.shape(tensors[0])[0]
    floats = [tf.cast(t, tf.float32) for t in tensors]
    # |x| as an int32 orders like |x| and puts NaN above Inf (0x7f800000).
    magnitudes = [
        tf.bitwise.bitwise_and(tf.bitcast(tf.reshape(t, [batch, -1]), tf.int32), 2**31 - 1)
        for t in floats
    ]
    top = tf.reduce_max(tf.stack([tf.reduce_max(m, axis=1) for m in magnitudes]), axis=0)
    biased = tf.bitwise.right_shift(top, 23)  # 0 for 0 and subnormals, 255 for Inf and NaN
    exponent = tf.clip_by_value(biased - 127, -126, 126)
    inverse = _power_of_two(-exponent)
    scaled = [t * tf.reshape(inverse, [-1] + [1] * (t.shape.rank - 1)) for t in floats]
    return _Scaled(
        tensors=scaled,
        exponent=exponent,
        flush=_TINY * tf.maximum(inverse, 1.0),
        zero=tf.equal(top, 0),
        nonfinite=tf.greater_equal(biased, 255),
    )


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

    layer: keras.layers.Layer
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

    def norms(self) -> tf.Tensor:
        """[batch] upper bounds of the per-example kernel gradients' L2 norms.

        Provably at least the exact norm of P_i^T G_i (see the module
        docstring), and at least sqrt(k) T_i and 2^-126. 0 for an example
        whose inputs or output gradients are all zero; NaN for one with a
        non-finite entry; finite for any finite example whose bound fits in
        float32 (Inf, so dropped, beyond).

        Raises:
          ValueError: for rows so long (p or o over about 1.5 million) that
            float32 Gram entries carry almost no guaranteed digit.
        """
        scaled_p = _unit_scaled(self.inputs)
        scaled_g = _unit_scaled(self.output_grads)
        batch = tf.shape(self.inputs[0])[0]
        g = tf.concat([_per_example_rows(_merge_views(t), batch) for t in scaled_g.tensors], 1)
        a_gram = self._input_gram(scaled_p.tensors, batch)
        g_gram = tf.matmul(g, g, transpose_b=True)
        rows = tf.cast(tf.shape(g)[1], tf.float32)
        p = 1
        for dim in self.layer.kernel.shape[:-1]:
            p *= int(dim)
        o = int(self.layer.kernel.shape[-1])
        # Static: TF32 rounds both factors of each product, (1 + u_in)^2 - 1 <= 3 u_in.
        gamma_p = p * _U / (1.0 - p * _U) + 3.0 * _matmul_input_roundoff()
        gamma_o = o * _U / (1.0 - o * _U) + 3.0 * _matmul_input_roundoff()
        if not (0 <= gamma_p < 0.1 and 0 <= gamma_o < 0.1):
            raise ValueError(
                f"Rows of {p} inputs and {o} outputs are too long for a float32 ghost norm."
            )
        # Squared row norms from the Gram diagonals: a sum of p nonnegative
        # terms errs by at most gamma_p of itself, plus 4 p 2^-126 (each of its
        # 2p - 1 operations may flush an underflowing result).
        n2 = (tf.linalg.diag_part(a_gram) + 4.0 * p * _TINY) / (1.0 - gamma_p)
        m2 = (tf.linalg.diag_part(g_gram) + 4.0 * o * _TINY) / (1.0 - gamma_o)
        # T = sum_s n_s m_s: nonnegative terms; rows + 8 roundings at most,
        # doubled; 4 rows 2^-126 for flushed products and sums.
        t = (
            tf.reduce_sum(tf.sqrt(n2) * tf.sqrt(m2), axis=1) * (1.0 + 2.0 * _gamma(rows + 8.0))
            + 4.0 * rows * _TINY
        )
        # <A, B>: products rounded once, then a pairwise sum of depth d (whose
        # terms must be counted statically: rows from the static shapes).
        counts = [t_call.shape[1:-1].num_elements() for t_call in self.output_grads]
        flat = [batch, -1] if None in counts else [-1, sum(counts) ** 2]
        computed, depth = _tree_sum(tf.reshape(a_gram * g_gram, flat))
        gamma_sum = _gamma(tf.cast(depth, tf.float32) + 1.0)
        gammas = gamma_p + gamma_o + gamma_sum
        usable = gammas < 0.1  # else only T bounds the norm
        k = tf.where(usable, 2.0 * gammas, 0.0)
        underflow = rows * rows * (512.0 * p * o + 4.0) * _TINY
        squared = tf.maximum(computed, 0.0) + k * tf.square(t) + underflow
        route = tf.where(usable, tf.sqrt(squared), float("inf"))
        flush = 4.0 * rows * float(p * o) ** 0.5 * (scaled_p.flush + scaled_g.flush)
        scaled = (tf.minimum(route, t) + flush) * (1.0 + 2.0**-20)
        # Times a * g = 2^(e_a + e_g), in two exact halves: an intermediate
        # overflows only if the result does, and flushes to zero only if the
        # result is below 2^-126 (as scaled >= c >= 2^-123): then 2^-126
        # bounds it.
        total = scaled_p.exponent + scaled_g.exponent
        half = tf.math.floordiv(total, 2)
        norms = tf.maximum(scaled * _power_of_two(half) * _power_of_two(total - half), _TINY)
        norms = tf.where(tf.logical_or(scaled_p.zero, scaled_g.zero), tf.zeros_like(norms), norms)
        bad = tf.logical_or(scaled_p.nonfinite, scaled_g.nonfinite)
        return tf.where(bad, tf.fill(tf.shape(norms), float("nan")), norms)

    def squared_norms(self) -> tf.Tensor:
        """[batch] upper bounds of the squared norms: `norms()` squared, rounded up.

        NaN for an example with a non-finite input or output gradient; Inf
        when the bound exceeds about 1.8e19 (see `rescaled_norms`); at least
        2^-126 unless 0 (a smaller square would flush to zero).
        """
        norms = self.norms()
        squared = tf.maximum(tf.square(norms) * (1.0 + 2.0**-22), _TINY)
        return tf.where(norms > 0, squared, tf.square(norms))  # 0, or NaN

    def rescaled_norms(self) -> tf.Tensor:
        """[batch] `norms()`: computed on rescaled inputs, they never overflow.

        Finite for any finite gradient whose norm bound fits in float32, NaN
        for an example with a non-finite entry.
        """
        return self.norms()

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
