"""Ghost norms on JAX: Dense and convolution kernels, Embedding tables, without vmapped gradients.

A Dense layer's per-example kernel gradient is sum_t a_t d_t^T, with a_t its
inputs and d_t the gradient of the example's loss at its pre-activation
outputs (t over the views and any sequence positions of the example). Its
squared norm is sum_{t,s} (a_t . a_s)(d_t . d_s) (the "ghost norm",
Goodfellow 2015; Li et al. 2022), and the clipped sum over examples is one
contraction sum_i f_i sum_t a_it d_it^T with each example's factor
f_i = min(1, C/||g_i||) (book-keeping, Bu et al. 2023). An Embedding table's
per-example gradient puts d_t on row id_t: the d_t of equal ids are summed
(sorted, a segment sum: at most T rows per example), normed, and the clipped
sum is one scatter-add of the rows' f_i-scaled sums. So the per-example pass
forms a (or the ids) and d, never an [in, out] or [vocabulary, dim]
gradient per example.

A convolution (Conv1D, Conv2D) is a Dense layer on its unfolded input
patches: a_t is the receptive field of output position t (kernel size x
input channels), so the same two forms hold with T the output positions
(times the views). Where the Gram form pays (T (in + out) < in out, the
small feature maps of a network's last stage) it is used with its rounding
bounds; elsewhere, for kernels of 32,768 weights or more, each example's
kernel gradient sum_t a_t d_t^T is FORMED, as one batched matrix product of
the patches and d, and normed and summed as formed (no bound needed: the
values normed are the values added). Formed from patches, it is 1.5-5.6x
faster on CPU than vmapping the convolution's own backward pass, which XLA
turns into a grouped convolution (measured on 2 cores, 96 rows, 3x3
kernels: 32x32x64 -> 64, 383 ms vmapped, 253 ms formed; 8x8x256 -> 256,
508 ms vmapped, 49 ms by the Gram form); smaller kernels keep the vmapped
gradient, faster for them inside the whole step (`_FORMED_MIN_KERNEL`).

The layer's call is replaced while the per-example loss is traced: the same
arithmetic as Keras's `Dense.call` / `Embedding.call` / `BaseConv.call`, plus
a zero added to the (pre-activation) outputs, whose gradient is d, and the
inputs recorded. Only plain layers qualify (their class's own `call` and
convolution, none set on the instance, no LoRA, no quantization, channels
last, no groups, no causal padding, a trainable weight, called once per
forward pass, the weight read by nothing else: a tied weight's other use
would add gradient that the taps do not see, and no other tapped layer
holding the same variable), and Dense only where the ghost norm costs less
than the gradient itself: T^2 (in + out) < T in out, with T the rows the
layer sees per example.
"""

import collections
import contextlib
import itertools
import math
from typing import Any, Dict, List, NamedTuple, Optional

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import keras
from keras import ops
from keras.src.layers.convolutional.base_conv import BaseConv

DENSE, EMBEDDING, CONV = "dense", "embedding", "conv"
# The convolutions whose arithmetic the tap repeats (`_plain_convolution`).
_CONVOLUTIONS = (keras.layers.Conv1D, keras.layers.Conv2D)
# A convolution whose Gram form does not pay is taken with its per-example
# kernel gradients formed from patches when the kernel has at least this
# many weights (patch length x output channels); smaller ones keep the
# vmapped gradient, faster for them inside the whole step. Measured on 2 CPU
# cores, private steps at B 64: small CNN (kernels of 432 and 4,608) 47 ms
# with all its convolutions formed, 30 ms with neither; WideResNet-16-4
# 3.10 s with the kernels of 32,768 and more formed, 4.16 s with none.
# On large feature maps every kernel is formed: XLA's CPU backend runs the
# vmapped backward pass as a grouped convolution, slow in the positions
# (small CNN on ImageNet's 224 x 224, kernels of 432 and 4,608, K 2, 32 rows:
# 100 s a step vmapped, 25 s formed).
_FORMED_MIN_KERNEL = 32_768
_FORMED_MIN_POSITIONS = 64 * 64


class GhostWeight(NamedTuple):
    """A layer weight clipped by its ghost norm.

    Attributes:
      layer: The Dense, convolution or Embedding layer.
      kind: DENSE or CONV (its kernel) or EMBEDDING (its table).
      index: The weight's index in the model's trainable variables.
      output_shape: The shape of the layer's (pre-activation) outputs for one example.
      output_dtype: Their dtype (the layer's compute dtype).
      formed: For CONV: each example's kernel gradient is formed from the
        patches (the Gram form would cost more).
    """

    layer: keras.layers.Layer
    kind: str
    index: int
    output_shape: tuple
    output_dtype: Any
    formed: bool = False


def _weight(layer, kind):
    return layer._embeddings if kind == EMBEDDING else layer._kernel


def _plain_convolution(layer) -> bool:
    # The class's own Keras call (Conv1D has its own, for "causal" padding)
    # and convolution: a subclass that transforms the kernel (WSConv2D) has
    # another gradient than the patches' product.
    own_call = keras.layers.Conv1D.call if layer.rank == 1 else BaseConv.call
    return (
        type(layer).call is own_call
        and type(layer).convolution_op is BaseConv.convolution_op
        and "convolution_op" not in vars(layer)
        and layer.data_format == "channels_last"
        and layer.groups == 1
        and layer.padding in ("valid", "same")
    )


def _kind(layer) -> Optional[str]:
    """DENSE or EMBEDDING for a plain layer of that class, else None."""
    if "call" in vars(layer) or getattr(layer, "quantization_mode", None) is not None:
        return None  # (a call set on the instance is the user's: left alone)
    if getattr(layer, "lora_enabled", False):
        return None
    if isinstance(layer, keras.layers.Dense) and type(layer).call is keras.layers.Dense.call:
        kind = DENSE
    elif (
        isinstance(layer, keras.layers.Embedding)
        and type(layer).call is keras.layers.Embedding.call
    ):
        kind = EMBEDDING
    elif isinstance(layer, _CONVOLUTIONS) and _plain_convolution(layer):
        kind = CONV
    else:
        return None
    weight = getattr(layer, "_embeddings" if kind == EMBEDDING else "_kernel", None)
    return kind if weight is not None and weight.trainable else None


@contextlib.contextmanager
def tapped(
    layers: List,
    kinds: List[str],
    taps: Optional[List],
    recorded: Dict[int, list],
    weights: Optional[List] = None,
):
    """Context manager: `layers` add `taps[j]` to their outputs and record their inputs.

    Args:
      layers: Dense, convolution and Embedding layers.
      kinds: Each one's kind (DENSE, CONV or EMBEDDING).
      taps: For each layer, what to add to its (pre-activation) outputs (a
        zero whose gradient is d), or None to add nothing.
      recorded: Filled with {j: [(inputs, outputs before activation) of each call]}.
      weights: None, or for each layer the value its call reads instead of
        its kernel (table): what tells a tied weight apart (`ghost_weights`).
    """

    def weight(j, layer, kind):
        if weights is None:
            return layer.embeddings if kind == EMBEDDING else layer.kernel
        if kind == EMBEDDING:  # (Embedding does not autocast its table)
            return weights[j]
        return ops.cast(weights[j], layer.compute_dtype)

    def dense_call(j, layer):
        def call(inputs, training=None):
            del training  # (Dense ignores it)
            x = ops.matmul(inputs, weight(j, layer, DENSE))
            if layer.bias is not None:
                x = ops.add(x, layer.bias)
            if taps is not None:
                x = x + taps[j]
            recorded.setdefault(j, []).append((inputs, x))
            if layer.activation is not None:
                x = layer.activation(x)
            return x

        return call

    def embedding_call(j, layer):
        def call(inputs):
            if inputs.dtype != "int32" and inputs.dtype != "int64":
                inputs = ops.cast(inputs, "int32")
            table = weight(j, layer, EMBEDDING)
            x = ops.cast(ops.take(table, inputs, axis=0), dtype=layer.compute_dtype)
            if taps is not None:
                x = x + taps[j]
            recorded.setdefault(j, []).append((inputs, x))
            return x

        return call

    def conv_call(j, layer):
        def call(inputs):
            x = ops.conv(
                inputs,
                weight(j, layer, CONV),
                strides=list(layer.strides),
                padding=layer.padding,
                dilation_rate=layer.dilation_rate,
                data_format=layer.data_format,
            )
            if layer.use_bias:
                x = ops.add(x, ops.reshape(layer.bias, (1,) * (layer.rank + 1) + (layer.filters,)))
            if taps is not None:
                x = x + taps[j]
            recorded.setdefault(j, []).append((inputs, x))
            if layer.activation is not None:
                x = layer.activation(x)
            return x

        return call

    makers = {DENSE: dense_call, EMBEDDING: embedding_call, CONV: conv_call}
    for j, (layer, kind) in enumerate(zip(layers, kinds)):
        object.__setattr__(layer, "call", makers[kind](j, layer))
    try:
        yield
    finally:
        for layer in layers:
            object.__delattr__(layer, "call")


def _rows_per_example(shape) -> int:
    rows = 1
    for dim in shape[:-1]:
        rows *= int(dim)
    return rows


def _pays(inputs, outputs) -> bool:
    """Whether the Gram form costs less than the gradient it norms (inputs: rows or patches)."""
    rows = _rows_per_example(outputs.shape)
    fan_in, fan_out = int(inputs.shape[-1]), int(outputs.shape[-1])
    return rows * (fan_in + fan_out) < fan_in * fan_out


def _read_elsewhere(example_loss, params, example, layers, kinds, indices) -> List[bool]:
    """For each layer, whether its weight is read by anything but the layer's own call.

    The layers read their weights from separate arguments of a traced loss;
    a weight whose entry in the parameters is still used in the trace is
    tied (an output projection reading an Embedding table, say). Its other
    use adds gradient the taps do not see, so it keeps its per-example
    gradient (measured before this check: a tied table's update came out
    wrong by 90%). An unused argument that a nested computation keeps in its
    signature also counts as read: the safe side.
    """
    shapes = [jax.ShapeDtypeStruct(p.shape, p.dtype) for p in params]
    own = [shapes[i] if i is not None else None for i in indices]

    def forward(p, w):
        with tapped(layers, kinds, None, {}, weights=w):
            return example_loss(p, example)

    closed = jax.make_jaxpr(forward)(shapes, own)
    jaxpr = closed.jaxpr
    used = {id(v) for eqn in jaxpr.eqns for v in eqn.invars if isinstance(v, jax_core.Var)}
    used |= {id(v) for v in jaxpr.outvars if isinstance(v, jax_core.Var)}
    param_vars = jaxpr.invars[: len(params)]
    return [i is not None and id(param_vars[i]) in used for i in indices]


def ghost_weights(model, example_loss, params, example) -> List[GhostWeight]:
    """The model's kernels and Embedding tables worth clipping by their ghost norms.

    A plain convolution qualifies by its Gram form where that pays, else
    formed from its patches if its kernel is large enough; Dense kernels
    and Embedding tables where the ghost norm pays (module docstring).

    Args:
      model: The private model.
      example_loss: (params, example) -> (loss, outputs) for one example.
      params: The trainable parameters.
      example: One example (its shapes are what matter).

    Returns:
      The `GhostWeight`s, in the order of the model's layers.
    """
    candidates = [(layer, _kind(layer)) for layer in model._flatten_layers()]
    candidates = [(layer, kind) for layer, kind in candidates if kind is not None]
    if not candidates:
        return []
    layers, kinds = [c[0] for c in candidates], [c[1] for c in candidates]
    recorded: Dict[int, list] = {}

    def forward(p, e):
        with tapped(layers, kinds, None, recorded):
            return example_loss(p, e)

    jax.eval_shape(forward, params, example)
    indices = {id(v): i for i, v in enumerate(model.trainable_variables)}
    weight_indices = [indices.get(id(_weight(layer, kind))) for layer, kind in candidates]
    tied = _read_elsewhere(example_loss, params, example, layers, kinds, weight_indices)
    # One variable held by two tapped layers (weights shared by assignment):
    # each reads its own copy in `_read_elsewhere`'s trace, so neither looks
    # tied, but the example's gradient of the variable is the SUM of their
    # parts, whose norm the parts' norms do not give (measured: two layers
    # moved the update by sqrt(2) lr C / B, ten by sqrt(10)).
    shared = _held_by_several(weight_indices)
    chosen = []
    for j, (layer, kind) in enumerate(candidates):
        calls = recorded.get(j, [])
        index = weight_indices[j]
        if len(calls) != 1 or index is None or tied[j] or index in shared:
            # A shared layer (two calls), one the loss does not reach, a
            # tied weight, a weight held by another layer too.
            continue
        inputs, outputs = calls[0]
        formed = False
        if kind == DENSE:
            pays = _pays(inputs, outputs)
        elif kind == CONV:
            patches = _patch_shape(layer, inputs)
            formed = not _pays(patches, outputs)
            # Formed from patches only for large kernels or feature maps:
            # otherwise the vmapped backward pass was faster inside the step.
            kernel = int(patches.shape[-1]) * int(outputs.shape[-1])
            spatial = (
                outputs.shape[-3:-1]
                if isinstance(layer, keras.layers.Conv2D)
                else outputs.shape[-2:-1]
            )
            positions = math.prod(int(d) for d in spatial)
            pays = not formed or kernel >= _FORMED_MIN_KERNEL or positions >= _FORMED_MIN_POSITIONS
        else:
            # The segment sum costs about the lookup's own backward pass,
            # where a per-example table costs vocabulary x dim.
            pays = True
        if pays:
            chosen.append(
                GhostWeight(
                    layer, kind, weight_indices[j], tuple(outputs.shape), outputs.dtype, formed
                )
            )
    return chosen


def _held_by_several(weight_indices: List[Optional[int]]) -> set:
    """The indices of the trainable variables that several tapped layers hold."""
    held_by = collections.Counter(i for i in weight_indices if i is not None)
    return {i for i, count in held_by.items() if count > 1}


def check_distinct(ghost: List[GhostWeight]) -> None:
    """Refuses ghost weights that share a variable (`ghost_weights` leaves them out).

    Raises:
      ValueError: when two of them hold the same variable: the norms of its
        parts would not bound the norm of their sum.
    """
    indices = [g.index for g in ghost]
    if len(set(indices)) != len(indices):
        raise ValueError("A variable is held by two ghost-clipped layers (ghost_weights).")


def _patch_shape(layer, inputs) -> jax.ShapeDtypeStruct:
    """The shape of `_patches(layer, inputs)`."""
    return jax.eval_shape(lambda a: _patches(layer, a), inputs)


def _patches(layer, inputs: jax.Array) -> jax.Array:
    """[n, *output positions, input channels x kernel size]: each output position's receptive field.

    The last axis runs over input channels first, then kernel offsets
    (`_kernel_layout` puts a gradient of this layout in the kernel's), as
    `lax.conv_general_dilated_patches` lays it out. Built from one strided
    slice per kernel offset (copies): that function is a convolution with
    an identity kernel, (in x kernel size)^2 products per output position
    (for keras.io's text model's Conv1D of 7 x 128 inputs, 896 per value
    copied), which took most of its private step.
    """
    x = inputs.astype(jnp.float32)
    x = x.reshape((-1,) + x.shape[-layer.rank - 1 :])
    pads, positions = [(0, 0)], []
    geometry = list(zip(x.shape[1:-1], layer.kernel_size, layer.strides, layer.dilation_rate))
    for length, size, stride, dilation in geometry:
        span = (size - 1) * dilation + 1
        if layer.padding == "same":  # (the split XLA and TensorFlow make)
            out = -(-length // stride)
            total = max((out - 1) * stride + span - length, 0)
            pads.append((total // 2, total - total // 2))
        else:
            out = (length - span) // stride + 1
            pads.append((0, 0))
        positions.append(out)
    x = jnp.pad(x, pads + [(0, 0)])
    windows = []
    for offsets in itertools.product(*(range(size) for size in layer.kernel_size)):
        starts = [j * dilation for j, (_, _, _, dilation) in zip(offsets, geometry)]
        limits = [
            start + (out - 1) * stride + 1
            for start, out, (_, _, stride, _) in zip(starts, positions, geometry)
        ]
        windows.append(
            jax.lax.slice(
                x,
                (0, *starts, 0),
                (x.shape[0], *limits, x.shape[-1]),
                (1, *layer.strides, 1),
            )
        )
    stacked = jnp.stack(windows, axis=-1)  # [n, *positions, in, offsets]
    return stacked.reshape(stacked.shape[: layer.rank + 1] + (-1,))


def _kernel_layout(layer, gradient: jax.Array) -> jax.Array:
    """[in x kernel size, out] in the patches' order -> the kernel's [*kernel size, in, out]."""
    channels = gradient.shape[0] // math.prod(layer.kernel_size)
    split = gradient.reshape((channels,) + tuple(layer.kernel_size) + (gradient.shape[-1],))
    return jnp.moveaxis(split, 0, layer.rank)


def _rescaled(a: jax.Array):
    """(a / max|a|, max|a|), with the scale 1 for a zero or non-finite maximum."""
    top = jnp.max(jnp.abs(a))
    safe = jnp.where(jnp.logical_and(top > 0, jnp.isfinite(top)), top, 1.0)
    return a / safe, top


# Matrix products of the norms and of the clipped sums in true float32: on
# GPUs JAX's default precision may round float32 products to TF32 (10-bit
# mantissas), which the error bound below does not cover.
_EXACT = jax.lax.Precision.HIGHEST
# A float32 rounding unit with a factor 2 of margin (2 ** -24 is u).
_UNIT = 2.0**-23


def table_rows(ids: jax.Array, vocabulary: int) -> jax.Array:
    """The table row each id reads: a negative id wraps as in numpy (`ops.take` does).

    Two ids of one row (9 and -1 in a table of 10) must count as one in the
    norm, or the norm would miss their gradients' sum (review of this change).
    """
    return jnp.where(ids < 0, ids + vocabulary, ids)


def ghost_norm(inputs: jax.Array, grads: jax.Array, rows_per_sum: int) -> jax.Array:
    """A norm of one example's kernel gradient, never below what its clipped sum adds.

    The Gram form sum_{t,s} (a_t . a_s)(d_t . d_s) cancels: where the rows'
    products a_t d_t^T nearly cancel, its float32 value can be 0 while the
    contraction that adds the example's gradient still adds about
    u * sum_t |a_t| |d_t| (review: an input scaled by 1e4 moved the update 8x
    past lr C / B). So the norm returned is an upper bound of both: the
    Gram value plus its rounding bound (in + out + T^2 + 8) u S^2, square
    rooted, plus the contraction's rounding bound (rows_per_sum * T + 8) u S,
    with S = sum_t |a_t| |d_t|. Without cancellation it exceeds the exact
    norm by a relative 1e-5 or so.

    Args:
      inputs: The layer's inputs (or a convolution's patches) for one
        example: [..., in] (a).
      grads: [..., out] the gradient at its (pre-activation) outputs (d).
      rows_per_sum: How many examples' rows one clipped sum adds up (the chunk).

    Returns:
      The norm (float32), taken on rescaled values so that it does not
      overflow where the gradient's entries are finite.
    """
    d = grads.astype(jnp.float32).reshape((-1, grads.shape[-1]))
    d, d_top = _rescaled(d)
    d_norms = jnp.sqrt(jnp.sum(jnp.square(d), axis=-1))
    positions = d.shape[0]
    a = inputs.astype(jnp.float32).reshape((-1, inputs.shape[-1]))
    a, a_top = _rescaled(a)
    gram_a = jnp.matmul(a, a.T, precision=_EXACT)
    total = jnp.sum(jnp.sqrt(jnp.sum(jnp.square(a), axis=-1)) * d_norms)
    squared = jnp.sum(gram_a * jnp.matmul(d, d.T, precision=_EXACT))
    total = total * (1.0 + 1e-5)  # (S itself is rounded)
    gram_error = (a.shape[-1] + d.shape[-1] + positions * positions + 8) * _UNIT * total * total
    sum_error = (rows_per_sum * positions + 8) * _UNIT * total
    return a_top * d_top * (jnp.sqrt(jnp.maximum(squared, 0.0) + gram_error) + sum_error)


def example_table_gradient(ids: jax.Array, grads: jax.Array, vocabulary: int):
    """One example's gradient of an Embedding table: the rows it reads and their sums.

    Position t adds d_t to row id_t: the example's gradient is, for each row
    it reads, the sum of its positions' d_t. The ids are sorted and the d_t
    of equal ids summed (a segment sum): T rows at most, in T log T + T dim
    operations, where the Gram form took T^2 dim and a table per example
    V dim. Its
    norm is the norm of these sums, and the clipped sum adds these sums
    scaled (`clipped_sum`): the values normed are the values added.

    Args:
      ids: The example's ids, any shape (views and positions).
      grads: [..., dim] the gradient at the lookup's outputs (d).
      vocabulary: The table's rows.

    Returns:
      (rows [T] int32, sums [T, dim] float32): the table rows read (a row
      read at several positions once; the unused tail is row 0 with a sum
      of 0).
    """
    rows = table_rows(ids.reshape((-1,)).astype(jnp.int32), vocabulary)
    d = grads.astype(jnp.float32).reshape((rows.shape[0], grads.shape[-1]))
    order = jnp.argsort(rows)
    rows, d = rows[order], d[order]
    starts = jnp.concatenate([jnp.ones((1,), bool), rows[1:] != rows[:-1]])
    segment = jnp.cumsum(starts) - 1
    sums = jax.ops.segment_sum(d, segment, num_segments=rows.shape[0])
    touched = jnp.zeros_like(rows).at[segment].max(rows)
    return touched, sums


def example_norm(ghost: GhostWeight, inputs: jax.Array, grads: jax.Array, rows_per_sum: int):
    """One example's norm of its gradient of `ghost`, and what its clipped sum needs.

    Args:
      ghost: The weight.
      inputs: What the layer recorded for the example (its inputs, or ids).
      grads: The gradient at its (pre-activation) outputs (d).
      rows_per_sum: How many examples' rows one clipped sum adds up (the chunk).

    Returns:
      (norm, carried): the norm (`ghost_norm`'s bound, or for a formed
      convolution gradient the norm of the gradient formed), and the tuple
      `clipped_sum` takes for the example.
    """
    if ghost.kind == EMBEDDING:
        rows, sums = example_table_gradient(inputs, grads, int(ghost.layer.input_dim))
        scaled, top = _rescaled(sums)
        return top * jnp.sqrt(jnp.sum(jnp.square(scaled))), (rows, sums)
    if ghost.kind == DENSE:
        return ghost_norm(inputs, grads, rows_per_sum), (inputs, grads)
    patches = _patches(ghost.layer, inputs)
    if not ghost.formed:
        return ghost_norm(patches, grads, rows_per_sum), (inputs, grads)
    a = patches.reshape((-1, patches.shape[-1]))
    d = grads.astype(jnp.float32).reshape((-1, grads.shape[-1]))
    formed = jnp.matmul(a.T, d, precision=_EXACT)
    scaled, top = _rescaled(formed)
    return top * jnp.sqrt(jnp.sum(jnp.square(scaled))), (formed,)


def clipped_sum(ghost: GhostWeight, carried: tuple, factors: jax.Array, finite) -> jax.Array:
    """The clipped sum of the rows' gradients of one ghost weight.

    Args:
      ghost: The weight.
      carried: What `example_norm` returned for the rows, stacked: (inputs,
        grads) -- the rows' inputs (a, or ids) and the gradients at their
        outputs -- or (formed gradients,) for a formed convolution.
      factors: [rows] each row's clipping factor (0 for padding, non-finite).
      finite: [rows] False where a row's gradient is not finite: its values
        are set to 0 first (a product with 0 would keep NaN).

    Returns:
      The weight's shape, float32.
    """
    if ghost.kind == CONV and ghost.formed:
        (formed,) = carried
        formed = jnp.where(finite[:, None, None], formed.astype(jnp.float32), 0.0)
        total = jnp.tensordot(factors, formed, axes=1, precision=_EXACT)
        return _kernel_layout(ghost.layer, total)
    inputs, grads = carried
    rows = grads.shape[0]
    d = grads.astype(jnp.float32).reshape((rows, -1, grads.shape[-1]))
    d = jnp.where(finite[:, None, None], d, 0.0)
    if ghost.kind != EMBEDDING:
        if ghost.kind == CONV:
            inputs = _patches(ghost.layer, inputs)
        a = inputs.astype(jnp.float32).reshape((rows, -1, inputs.shape[-1]))
        a = jnp.where(finite[:, None, None], a, 0.0)
        total = jnp.einsum("r,rti,rto->io", factors, a, d, precision=_EXACT)
        return _kernel_layout(ghost.layer, total) if ghost.kind == CONV else total
    # The rows' table gradients as normed (`example_table_gradient`), scaled.
    weighted = (factors[:, None, None] * d).reshape((-1, d.shape[-1]))
    table = ghost.layer._embeddings
    return jnp.zeros(table.shape, jnp.float32).at[inputs.reshape((-1,))].add(weighted, mode="drop")
