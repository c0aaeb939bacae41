"""The noisy sum of clipped per-example gradients, in JAX.

`clipped_sum` forms each example's gradient with `jax.vmap` (the gradient of
the mean loss over its K views, so views are averaged BEFORE clipping),
clips it to L2 norm C over all variables, and sums the kept examples (the
large Dense kernels, Embedding tables and convolution kernels by their
ghost norms or gradients formed from patches, `ghost_norms.py`, without
vmapping their gradients). The
examples are processed in chunks by `jax.lax.scan`, so that one `vmap` forms
at most `chunk_size` per-example gradients; up to 16 chunks are unrolled (no
loop at run time).

On several devices the per-example work runs inside `jax.shard_map` over the
batch axis and the sums are reduced with `psum`: left to automatic
partitioning (GSPMD), vmapped convolution gradients came out wrong on every
device but the first. The noise is drawn once, outside, from a key every
device holds, so all replicas add the same noise exactly once.

The shard_map runs over a mesh of the same devices whose batch axis has a
name of the package's own (`ROWS_AXIS`), not the distribution's
`batch_dim_name`: a layer's collective over "batch" (a
SyncBatchNorm-style `jax.lax.pmean`) would otherwise be bound inside the
per-example computation, and each example's forward would read the rows
at its position on the other devices, which no clip bounds. Unbound, the
collective fails at trace (or a layer falls back to its one-device path),
as in the one-example trace `traced_loss.check` refuses collectives in.
"""

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from tan_keras.jax_dp import ghost_norms

# Where per-example results of a chunk go: the batch axis of the inputs.
_P = jax.sharding.PartitionSpec
# Chunks traced one after the other before the rest run in a loop.
_UNROLLED_CHUNKS = 16
_EXACT = jax.lax.Precision.HIGHEST
# The mesh axis the rows are split over inside the per-example computation,
# not the distribution's "batch" that layers written for Keras name. A layer
# naming this one is refused by the loss's trace, which binds it
# (`traced_loss`); the same in every process of a multi-host run, so that
# they compile one program.
ROWS_AXIS = "tan_keras_rows"


class ClippedSum(NamedTuple):
    """What one pass over a padded logical step produced.

    Attributes:
      grads: The sum of the clipped gradients of the kept examples (float32,
        the structure of the parameters).
      norms: [rows] the unclipped gradient norm of every row (0 for padding).
      losses: [rows] each row's loss (the mean over its views).
      outputs: The model's outputs per row, [rows, views, ...].
      nonfinite: [rows] True where a kept row's gradient was not finite (it
        then adds nothing).
    """

    grads: Any
    norms: jax.Array
    losses: jax.Array
    outputs: Any
    nonfinite: jax.Array


def _global_norm(tree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in leaves))


def _rescaled_global_norm(tree) -> jax.Array:
    """max|g| * ||g / max|g|||: finite for a finite gradient whose squares overflow.

    A NaN or infinite entry still gives a non-finite norm (NaN propagates
    through the max; an infinite max leaves an infinite sum).
    """
    leaves = [leaf.astype(jnp.float32) for leaf in jax.tree_util.tree_leaves(tree)]
    top = jnp.max(jnp.stack([jnp.max(jnp.abs(leaf)) for leaf in leaves]))
    safe = jnp.where(jnp.logical_and(top > 0, jnp.isfinite(top)), top, 1.0)
    return top * jnp.sqrt(sum(jnp.sum(jnp.square(leaf / safe)) for leaf in leaves))


def _rows_of_chunks(tree, chunk_size: int):
    return jax.tree_util.tree_map(
        lambda a: a.reshape((a.shape[0] // chunk_size, chunk_size) + a.shape[1:]), tree
    )


def _rows(tree):
    return jax.tree_util.tree_map(lambda a: a.reshape((-1,) + a.shape[2:]), tree)


def _combined_norm(parts: jax.Array) -> jax.Array:
    """sqrt(sum parts^2) over the last axis, rescaled so that it does not overflow."""
    top = jnp.max(parts, axis=-1)
    safe = jnp.where(jnp.logical_and(top > 0, jnp.isfinite(top)), top, 1.0)
    return top * jnp.sqrt(jnp.sum(jnp.square(parts / safe[..., None]), axis=-1))


def _zeroed_where_not(finite: jax.Array, g: jax.Array) -> jax.Array:
    # A product with 0 would keep NaN: rows that add nothing are set to 0 first.
    return jnp.where(finite.reshape((-1,) + (1,) * (g.ndim - 1)), g.astype(jnp.float32), 0.0)


def local_clipped_sum(
    example_loss: Callable,
    params,
    examples,
    keep: jax.Array,
    l2_norm_clip: float,
    chunk_size: int,
    ghost: Sequence[ghost_norms.GhostWeight] = (),
) -> ClippedSum:
    """The clipped sum over this device's rows (see the module docstring).

    Args:
      example_loss: (params, example) -> (loss, outputs) for ONE example
        (the mean loss over its views, and the model's outputs on them).
      params: The trainable parameters (a list of arrays).
      examples: A pytree of arrays with a leading axis of rows, a multiple
        of `chunk_size`.
      keep: [rows] bool, False for padding rows and rows dropped before the
        step (invalid labels).
      l2_norm_clip: C.
      chunk_size: Rows whose per-example gradients are formed at once.
      ghost: The weights clipped by their ghost norms
        (`ghost_norms.ghost_weights`): their per-example gradients are
        never formed.

    Returns:
      A `ClippedSum`.
    """
    ghost_norms.check_distinct(ghost)
    ghost_indices = [g.index for g in ghost]
    free_indices = [i for i in range(len(params)) if i not in set(ghost_indices)]
    layers, kinds = [g.layer for g in ghost], [g.kind for g in ghost]

    def loss_of(free, taps, example):
        # The ghost kernels are constants here: no gradient of theirs is formed.
        full = list(params)
        for i, p in zip(free_indices, free):
            full[i] = p
        recorded = {}
        with ghost_norms.tapped(layers, kinds, taps, recorded):
            loss, outputs = example_loss(full, example)
        return loss, (outputs, [recorded[j][0][0] for j in range(len(layers))])

    value_and_grad = jax.value_and_grad(loss_of, argnums=(0, 1), has_aux=True)

    def one_example(example):
        taps = [jnp.zeros(g.output_shape, g.output_dtype) for g in ghost]
        free = [params[i] for i in free_indices]
        (loss, (outputs, inputs)), (grads, tap_grads) = value_and_grad(free, taps, example)
        parts = [_global_norm(grads) if grads else jnp.float32(0.0)]
        carried = []
        for g, a, d in zip(ghost, inputs, tap_grads):
            norm, carry = ghost_norms.example_norm(g, a, d, chunk_size)
            parts.append(norm)
            carried.append(carry)
        return grads, carried, jnp.stack(parts), loss, outputs

    zero = [jnp.zeros(p.shape, jnp.float32) for p in params]

    def chunk(total, chunk_inputs):
        chunk_examples, kept = chunk_inputs
        grads, carried, parts, losses, outputs = jax.vmap(one_example)(chunk_examples)
        # A finite gradient whose squares overflow float32 (norm above ~1.8e19)
        # must be clipped, not dropped as non-finite: its norm is taken again,
        # rescaled, but only in a chunk where some kept row's norm came out
        # non-finite (one more pass over the gradients, rarely). The ghost
        # norms are rescaled already.
        parts = jax.lax.cond(
            jnp.logical_and(
                bool(free_indices),
                jnp.any(
                    jnp.logical_and(kept, jnp.logical_not(jnp.isfinite(_combined_norm(parts))))
                ),
            ),
            lambda g: parts.at[:, 0].set(jax.vmap(_rescaled_global_norm)(g) if g else 0.0),
            lambda g: parts,
            grads,
        )
        norms = _combined_norm(parts)
        finite = jnp.isfinite(norms)
        # Each row's factor min(1, C / norm), without dividing by 0; 0 for a
        # padding row or a non-finite gradient, whose entries are also set to
        # 0 first: those rows add an exact 0.
        factors = jnp.where(
            jnp.logical_and(kept, finite), l2_norm_clip / jnp.maximum(norms, l2_norm_clip), 0.0
        )
        total = list(total)
        for i, g in zip(free_indices, grads):
            # One contraction over the rows: 3x faster on CPU than scaling
            # every row's gradient and summing them (strided CNN, 96 rows).
            # In true float32: on GPUs the default precision may round the
            # rows' gradients to TF32, adding up to 2^-11 of C past the clip.
            total[i] = total[i] + jnp.tensordot(
                factors, _zeroed_where_not(finite, g), axes=1, precision=_EXACT
            )
        for g, carry in zip(ghost, carried):
            total[g.index] = total[g.index] + ghost_norms.clipped_sum(g, carry, factors, finite)
        nonfinite = jnp.logical_and(kept, jnp.logical_not(finite))
        return total, (jnp.where(kept, norms, 0.0), losses, outputs, nonfinite)

    chunks = keep.shape[0] // chunk_size
    total, (norms, losses, outputs, nonfinite) = jax.lax.scan(
        chunk,
        zero,
        (_rows_of_chunks(examples, chunk_size), _rows_of_chunks(keep, chunk_size)),
        # Unrolled: on XLA's CPU backend the same chunk ran 4-6x slower inside
        # a while loop (small CNN, B 64, chunks of 32: 259 ms in the loop, 44
        # ms unrolled). The cap keeps compile time bounded for large batches.
        unroll=min(chunks, _UNROLLED_CHUNKS),
    )
    return ClippedSum(total, _rows(norms), _rows(losses), _rows(outputs), _rows(nonfinite))


def clipped_sum(
    example_loss: Callable,
    params,
    examples,
    keep: jax.Array,
    l2_norm_clip: float,
    chunk_size: int,
    mesh: Optional[jax.sharding.Mesh] = None,
    batch_axis: Optional[str] = None,
    ghost: Sequence[ghost_norms.GhostWeight] = (),
) -> ClippedSum:
    """`local_clipped_sum` over all rows, split across `mesh`'s `batch_axis` if given.

    Args:
      example_loss, params, examples, keep, l2_norm_clip, chunk_size, ghost:
        as in `local_clipped_sum`; with a mesh, each device's share of the rows is
        a multiple of `chunk_size`.
      mesh: None (one device, or data not split), or the device mesh whose
        `batch_axis` the rows are split over.
      batch_axis: The mesh axis of the batch.

    Returns:
      A `ClippedSum` whose `grads` are the sum over all devices' rows.
    """
    if mesh is None or mesh.shape[batch_axis] == 1:
        return local_clipped_sum(
            example_loss, params, examples, keep, l2_norm_clip, chunk_size, ghost
        )

    def per_device(device_params, device_examples, device_keep):
        result = local_clipped_sum(
            example_loss,
            device_params,
            device_examples,
            device_keep,
            l2_norm_clip,
            chunk_size,
            ghost,
        )
        return result._replace(grads=jax.lax.psum(result.grads, ROWS_AXIS))

    rows = _P(ROWS_AXIS)
    return jax.shard_map(
        per_device,
        mesh=_private_mesh(mesh, batch_axis),
        in_specs=(_P(), rows, rows),
        out_specs=ClippedSum(_P(), rows, rows, rows, rows),
        check_vma=False,
    )(params, examples, keep)


def _private_mesh(mesh: jax.sharding.Mesh, batch_axis: str) -> jax.sharding.Mesh:
    """`mesh` (same devices, same order) with its batch axis renamed `ROWS_AXIS`."""
    names = tuple(ROWS_AXIS if name == batch_axis else name for name in mesh.axis_names)
    return jax.sharding.Mesh(mesh.devices, names, axis_types=mesh.axis_types)


def add_noise(grads, key_data: jax.Array, stddev: float):
    """`grads` plus N(0, stddev^2) noise on every coordinate, drawn from `key_data`.

    Args:
      grads: A pytree of float32 arrays (the clipped sum).
      key_data: uint32[2], the raw threefry key of this logical step.
      stddev: sigma * C; 0 adds nothing.

    Returns:
      The noisy pytree (float32).
    """
    if stddev == 0:
        return grads
    leaves, treedef = jax.tree_util.tree_flatten(grads)
    key = jax.random.wrap_key_data(key_data.astype(jnp.uint32), impl="threefry2x32")
    keys = jax.random.split(key, len(leaves))
    noisy = [
        leaf + stddev * jax.random.normal(k, leaf.shape, jnp.float32)
        for leaf, k in zip(leaves, keys)
    ]
    return jax.tree_util.tree_unflatten(treedef, noisy)
