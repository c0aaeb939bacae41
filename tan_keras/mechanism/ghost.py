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

Embedding. Example i's gradient of the [vocab, dim] table has one nonzero
row per distinct token among its ids t_j (all positions of its K views and
of every call): row v is R_iv = sum_{j: t_j = v} g_j, g_j the gradient of
the example's view-averaged loss with respect to looked-up row j (the 1/K is
in g already, as for Dense). The Gram form of its norm,
sum_{j,k} [t_j = t_k] g_j . g_k, costs rows^2 dim. Sorting each example's
ids instead puts equal tokens side by side, and one segment sum forms R_i
itself (at most rows x dim values, as many as the g_j) for rows dim plus the
sort: the formed gradient's nonzero rows, summed the same way, without its
vocab x dim zeros. A repeated token's row is one sum, so the cross terms
[t_j = t_k] g_j . g_k are in, and no Gram matrix means no cancellation of
the kind above. The norm is again a provable upper bound: with g divided by
a power of two as in 1. (entries below 4, flush eta each), in scaled units
  * an entry of R_iv, a sum of n_v values in any order, errs by at most
    gamma_{n_v - 1} times the sum of their magnitudes, plus 2 n_v eta for
    flushed inputs and sums; so any computed R'_i is within E + c of the
    exact R_i, E = sqrt(sum_v (gamma_{n_v - 1} sum_{j: t_j = v} ||g_j||)^2)
    and c = 2 rows sqrt(dim) eta (E = 0 when no id repeats);
  * the computed sum of R'_i's squares (over dim, then a pairwise tree over
    the slots) is below the true one by at most gamma_{dim + depth} of it
    plus 2 rows dim 2^-126 (flushed squares and sums): S_up undoes both.
The norm is (sqrt(S_up) + 2 (2 E + c)) (1 + 2^-20), E doubled for its own
rounding: it bounds the exact ||R_i|| (within E + c of ||R'_i||) and the
R_i that `clipped_sum` sums again, in an order of its own (within 2 E + 2 c).
`clipped_sum` forms each example's scaled R_i before examples are added
together, by token, into the table: an example's cancelling rows meet no
other example's in a rounded sum.
"""

from typing import List, NamedTuple, Optional, Sequence, Tuple

import keras
import tensorflow as tf

from tan_keras import _keras_internals
from tan_keras.mechanism import model_analysis

_DENSE = keras.layers.Dense
_CONV = keras.layers.Conv2D
_EMBEDDING = keras.layers.Embedding


def _rule(layer) -> Optional[str]:
    """ "dense", "conv" or "embedding" when `layer` has a ghost rule, else None."""
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
    if (
        type(layer) is _EMBEDDING
        # LoRA looks rows up in table + A B (trainable A and B, frozen table);
        # a quantized table is not a float variable: both keep formed gradients.
        and not getattr(layer, "lora_rank", None)
        and not getattr(layer, "lora_enabled", False)
        and getattr(layer, "quantization_mode", None) is None
    ):
        return "embedding"
    return None


def has_rule(layer: keras.layers.Layer) -> bool:
    """Whether `layer`'s weight matrix can be clipped by ghost norm (whatever the cost).

    Args:
      layer: A Keras layer.

    Returns:
      True for a Dense, a channels-last ungrouped Conv2D with "valid" or
      "same" padding, or an Embedding without LoRA or quantization (exact
      types, not subclasses).
    """
    return _rule(layer) is not None


def clipped_variable(layer: keras.layers.Layer):
    """The variable whose per-example gradients a `GhostGradient` of `layer` holds.

    Args:
      layer: A built layer with `has_rule`.

    Returns:
      Its `kernel`, or an Embedding's `embeddings`.

    Raises:
      AttributeError: if the layer is not built.
    """
    return layer.embeddings if _rule(layer) == "embedding" else layer.kernel


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


def embedding_is_cheaper(rows: int, vocab: int, dim: int) -> bool:
    """Whether an Embedding's ghost route costs less than its formed gradient.

    Per example, the formed gradient is a dense [vocab, dim] tensor, written
    (zeros and the scattered rows), read for the norm and again for the
    clipped sum, and held for the whole micro-batch at once. The ghost route
    sorts the example's ids (rows log2 rows comparisons) and passes over its
    rows * dim output gradients (already held) a few times: gather, segment
    sum, squares, and the clipped sum's scatter. Both make a few passes per
    value, so the leading terms decide. (The Gram form of the norm, rows^2 dim,
    is never cheaper than the segment sum and is not used.) Roughly: ghost
    when an example has fewer positions (times views) than the vocabulary.

    Args:
      rows: Ids per example (positions x K views).
      vocab: Rows of the table (`input_dim`).
      dim: Its columns (`output_dim`).

    Returns:
      True when rows * (dim + ceil(log2 rows)) < vocab * dim.
    """
    return rows * (dim + (rows - 1).bit_length()) < vocab * dim


def _clipped_variable_or_none(layer):
    try:
        return clipped_variable(layer)
    except AttributeError:  # not built
        return None


def select_layers(model: keras.Model, augmult: int) -> List[keras.layers.Layer]:
    """The layers of `model` whose weight matrices are clipped by ghost norm.

    A layer qualifies when its kernel (an Embedding's `embeddings`) is
    trainable, it has a rule (`has_rule`: Dense, channels-last ungrouped
    Conv2D with "valid" or "same" padding, Embedding without LoRA or
    quantization), its output shape is static, the ghost route is cheaper
    for its rows per example (`is_cheaper`, `embedding_is_cheaper`), and the
    variable is used by nothing but the layer's own calls (a tied kernel or
    table, e.g. read by a transposed decoder or an output projection, also
    gets gradient from the other use, which the layer's taps do not see: it
    keeps the per-example path).

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
        if rule is None or id(_clipped_variable_or_none(layer)) not in trainable:
            continue
        if tied is None:  # traced once per model, only if some layer has a rule
            tied = model_analysis.tied_variables(model)
        variable = clipped_variable(layer)
        if id(variable) in tied:
            continue
        positions = _output_positions(layer)
        if positions is None:
            continue
        rows = augmult * positions
        if rule == "embedding":
            cheaper = embedding_is_cheaper(rows, int(layer.input_dim), int(layer.output_dim))
        else:
            fan_in = 1
            for dim in variable.shape[:-1]:
                fan_in *= int(dim)
            cheaper = is_cheaper(rows, fan_in, int(variable.shape[-1]))
        if cheaper:
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


def _rows_of(t: tf.Tensor, trailing: int) -> tf.Tensor:
    """[batch, K, *positions, *trailing dims] -> [batch, K * positions, *trailing dims].

    Keeps the row count static when it is (for `_tree_sum`'s fixed order).
    """
    rank = t.shape.rank
    count = t.shape[1 : rank - trailing].num_elements()
    tail = t.shape[rank - trailing :].as_list()
    if count is None or None in tail:
        return tf.reshape(t, tf.concat([tf.shape(t)[:1], [-1], tf.shape(t)[rank - trailing :]], 0))
    return tf.reshape(t, [-1, count] + tail)


def _token_ids(t: tf.Tensor, vocab: int) -> tf.Tensor:
    """Ids as `Embedding.call` reads them (non-integers truncated), as int32.

    A negative id in [-vocab, 0) reads row id + vocab, as Keras's `take`
    wraps it: its row is that one. An id outside [-vocab, vocab) becomes -1:
    its row is dropped from the clipped sum (a GPU gather reads zeros there
    and its gradient drops it; a CPU gather fails first), while its output
    gradient still counts in the norm, which can only make the bound larger.
    """
    if t.dtype not in (tf.int32, tf.int64):
        t = tf.cast(t, tf.int32)
    t = tf.where(t < 0, t + tf.cast(vocab, t.dtype), t)
    valid = tf.logical_and(t >= 0, t < tf.cast(vocab, t.dtype))
    return tf.where(valid, tf.cast(t, tf.int32), -1)


def _embedding_rows(layer, ids: Sequence[tf.Tensor], grads: Sequence[tf.Tensor]):
    """([batch, rows] int32 ids, [batch, rows, dim] float32 g) over all calls and views."""
    ids = [_rows_of(_token_ids(t, int(layer.input_dim)), 0) for t in ids]
    grads = [_rows_of(tf.cast(g, tf.float32), 1) for g in grads]
    return tf.concat(ids, 1), tf.concat(grads, 1)


class _TokenSlots(NamedTuple):
    """Each example's rows summed by token (see `_sum_by_token`)."""

    tokens: tf.Tensor  # [batch * rows] each slot's token; 0 for an unused slot
    sums: tf.Tensor  # [batch * rows, dim] each slot's rows, summed; 0 if unused
    slots: tf.Tensor  # [batch * rows] the slot of each row, in sorted order
    order: tf.Tensor  # [batch, rows] the rows' sorted order (argsort of the ids)


def _sum_by_token(ids: tf.Tensor, g: tf.Tensor) -> _TokenSlots:
    """Sums each example's rows g of equal ids: its Embedding gradient's rows.

    Example i owns slots i * rows ... i * rows + rows - 1; its distinct ids
    take the first ones, in increasing order. A sort, not `tf.unique`:
    static shapes, so it runs under XLA.

    Args:
      ids: [batch, rows] int32.
      g: [batch, rows, dim] float32.

    Returns:
      A `_TokenSlots`.
    """
    batch, rows = tf.shape(ids)[0], tf.shape(ids)[1]
    order = tf.argsort(ids, axis=1, stable=True)
    ids = tf.gather(ids, order, batch_dims=1)
    first = tf.concat([tf.ones_like(ids[:, :1], tf.bool), ids[:, 1:] != ids[:, :-1]], 1)
    slots = tf.cumsum(tf.cast(first, tf.int32), axis=1) - 1 + rows * tf.range(batch)[:, None]
    slots = tf.reshape(slots, [-1])
    size = batch * rows
    g = tf.reshape(tf.gather(g, order, batch_dims=1), [-1, g.shape[-1]])
    sums = tf.math.unsorted_segment_sum(g, slots, size)
    # Only a slot's first row adds its id: an exact integer sum, 0 when unused.
    firsts = tf.reshape(tf.where(first, ids, tf.zeros_like(ids)), [-1])
    tokens = tf.math.unsorted_segment_sum(firsts, slots, size)
    return _TokenSlots(tokens, sums, slots, order)


def _embedding_norms(layer, ids: Sequence[tf.Tensor], grads: Sequence[tf.Tensor]) -> tf.Tensor:
    """[batch] upper bounds of ||R_i||_F, R_i an example's Embedding gradient rows.

    See the module docstring (Embedding) for the bound.
    """
    scaled = _unit_scaled(grads)
    ids, g = _embedding_rows(layer, ids, scaled.tensors)
    dim = int(g.shape[-1])
    batch, rows = tf.shape(ids)[0], tf.shape(ids)[1]
    rows_f = tf.cast(rows, tf.float32)
    gamma_dim = dim * _U / (1.0 - dim * _U)
    if not 0 <= gamma_dim < 0.1:
        raise ValueError(f"Rows of {dim} values are too long for a float32 ghost norm.")
    grouped = _sum_by_token(ids, g)
    # ||R'_i||^2: squares summed over dim (dim - 1 additions), then over the
    # slots in a fixed tree (depth additions).
    slot_squares = tf.reduce_sum(tf.square(grouped.sums), axis=1)
    static_rows = ids.shape[1]
    flat = [batch, -1] if static_rows is None else [-1, static_rows]
    computed, depth = _tree_sum(tf.reshape(slot_squares, flat))
    gamma_sum = _gamma(tf.cast(depth, tf.float32) + dim + 1.0)
    usable = gamma_sum < 0.1
    squared = (computed + 2.0 * rows_f * dim * _TINY) / (1.0 - tf.where(usable, gamma_sum, 0.0))
    # E: a slot of n rows sums them with n - 1 roundings, each relative to
    # the magnitudes summed, bounded by their row norms (rounded up).
    row_norms = tf.sqrt((tf.reduce_sum(tf.square(g), axis=2) + 2.0 * dim * _TINY) / (1 - gamma_dim))
    row_norms = tf.reshape(tf.gather(row_norms, grouped.order, batch_dims=1), [-1])
    size = batch * rows
    counts = tf.math.unsorted_segment_sum(tf.ones_like(row_norms), grouped.slots, size)
    magnitudes = tf.math.unsorted_segment_sum(row_norms, grouped.slots, size)
    slot_errors = tf.reshape(_gamma(tf.maximum(counts - 1.0, 0.0)) * magnitudes, [batch, rows])
    error = 2.0 * tf.sqrt(tf.reduce_sum(tf.square(slot_errors), axis=1))
    flush = 2.0 * rows_f * float(dim) ** 0.5 * scaled.flush
    bound = (tf.sqrt(squared) + 2.0 * (error + flush)) * (1.0 + 2.0**-20)
    bound = tf.where(usable, bound, float("inf"))
    # Times 2^e in two exact halves, as in `GhostGradient.norms`.
    half = tf.math.floordiv(scaled.exponent, 2)
    norms = tf.maximum(bound * _power_of_two(half) * _power_of_two(scaled.exponent - half), _TINY)
    norms = tf.where(scaled.zero, tf.zeros_like(norms), norms)
    return tf.where(scaled.nonfinite, tf.fill(tf.shape(norms), float("nan")), norms)


def _embedding_clipped_sum(layer, ids, grads, keep, denom, clip) -> tf.Tensor:
    """sum_i [keep_i] R_i * clip / denom_i, scattered into the [vocab, dim] table."""
    ids, g = _embedding_rows(layer, ids, grads)
    # Selected, not multiplied by 0 (0 * NaN = NaN); divided before the
    # multiplication by C, as C / a huge norm can underflow.
    g = tf.where(keep[:, None, None], g / denom[:, None, None], tf.zeros_like(g)) * clip
    # Each example's rows become R_i before examples are added together.
    grouped = _sum_by_token(ids, g)
    return tf.math.unsorted_segment_sum(grouped.sums, grouped.tokens, int(layer.input_dim))


def squared_bounds(norms: tf.Tensor) -> tf.Tensor:
    """`norms` (upper bounds) squared, rounded up: the form `squared_norms` returns.

    Args:
      norms: [batch] norm bounds from `GhostGradient.norms()`.

    Returns:
      [batch] bounds of the squared norms: at least 2^-126 unless 0, NaN
      where a norm is NaN, Inf where the square overflows.
    """
    squared = tf.maximum(tf.square(norms) * (1.0 + 2.0**-22), _TINY)
    return tf.where(norms > 0, squared, tf.square(norms))  # 0, or NaN


class GhostGradient(NamedTuple):
    """A kernel's per-example gradients, held as inputs and output gradients.

    Stands in for the `[batch, *kernel_shape]` tensor in a list of
    per-example gradients; `clipping.clip_and_sum` asks it for norms and for
    the clipped sum instead of forming it.

    Attributes:
      layer: The Dense, Conv2D or Embedding layer (see `select_layers`).
      inputs: One `[batch, K, *input_shape]` tensor per call of the layer
        (an Embedding's: its token ids).
      output_grads: One `[batch, K, *output_shape]` tensor per call: the
        gradient of each example's loss with respect to the pre-activation
        output (an Embedding's: the looked-up rows).
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
        if _rule(self.layer) == "embedding":
            return _embedding_norms(self.layer, self.inputs, self.output_grads)
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
        return squared_bounds(self.norms())

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
        if _rule(self.layer) == "embedding":
            return _embedding_clipped_sum(
                self.layer, self.inputs, self.output_grads, keep, denom, clip
            )
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
