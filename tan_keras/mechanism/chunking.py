"""Memory-bounded clipping: per-example gradients for a chunk of examples at a time.

Materialized per-example gradients take `batch x parameters` floats (704 MB for
WideResNet-16-4 at batch 64, more than all its activations). Clipping is per
example, so the micro-batch can be cut into chunks of c examples whose
gradients are computed, clipped and summed one chunk after the other: the sum
is the same, and only c examples' gradients (and activations) are alive at any
time. The chunks run in a `tf.while_loop` with `parallel_iterations=1`, which
is what keeps them from being scheduled side by side.
"""

import math
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import tensorflow as tf

from tan_keras.mechanism import clipping
from tan_keras.mechanism.clipping import ClippedSum

# "auto" keeps a chunk's per-example gradients within this many bytes.
AUTO_CHUNK_BYTES = 256 * 2**20

PerExampleFn = Callable[[tf.Tensor, tf.Tensor], Tuple[List[tf.Tensor], tf.Tensor, tf.Tensor]]


def chunk_size(
    batch: Optional[int],
    variables: Sequence[tf.Variable],
    examples_per_chunk: Union[int, str, None],
) -> Optional[int]:
    """The number of examples per chunk, or None for no chunking.

    Args:
      batch: Static micro-batch size, or None when only known at run time.
      variables: The trainable variables (their size sets the "auto" chunk).
      examples_per_chunk: "auto", None or an int >= 1.

    Returns:
      None when the micro-batch is processed at once, else c >= 1. An int
      is used as given (the last chunk is padded). For "auto" and a static
      batch the chunks are balanced, ceil(batch / n) examples each, with n
      chosen to keep each chunk's gradients within `AUTO_CHUNK_BYTES` and to
      waste the fewest padding rows.
    """
    if examples_per_chunk is None:
        return None
    if examples_per_chunk == "auto":
        per_example_bytes = 4 * sum(v.shape.num_elements() for v in variables)
        limit = max(1, AUTO_CHUNK_BYTES // max(per_example_bytes, 1))
    else:
        limit = examples_per_chunk
    if batch is None or examples_per_chunk != "auto":
        return None if batch is not None and batch <= limit else limit
    if batch <= limit:
        return None
    # The fewest chunks within the limit, or up to twice as many when that
    # wastes fewer padding rows (64 examples, limit 24: 4 x 16, not 3 x 22).
    fewest = math.ceil(batch / limit)
    num_chunks = min(
        range(fewest, 2 * fewest + 1), key=lambda n: (math.ceil(batch / n) * n - batch, n)
    )
    return math.ceil(batch / num_chunks)


def _pad_rows(t: tf.Tensor, pad: tf.Tensor) -> tf.Tensor:
    return tf.pad(t, [[0, pad]] + [[0, 0]] * (t.shape.rank - 1))


def _split(t: tf.Tensor, num_chunks, size: int) -> tf.Tensor:
    """[num_chunks * size, ...] -> [num_chunks, size, ...]."""
    return tf.reshape(t, tf.concat([[num_chunks, size], tf.shape(t)[1:]], 0))


def _merge(t: tf.Tensor, batch) -> tf.Tensor:
    """[num_chunks, size, ...] -> the first `batch` rows of [num_chunks * size, ...]."""
    flat = tf.reshape(t, tf.concat([[-1], tf.shape(t)[2:]], 0))
    return flat[:batch]


def clip_in_chunks(
    per_example_fn: PerExampleFn,
    variables: Sequence[tf.Variable],
    views: tf.Tensor,
    y: tf.Tensor,
    mask: tf.Tensor,
    l2_norm_clip: float,
    size: Optional[int],
    example_weights: Optional[tf.Tensor] = None,
    num_outputs: int = 1,
) -> Tuple[ClippedSum, tf.Tensor, Any]:
    """Per-example gradients, clipped and summed, `size` examples at a time.

    Args:
      per_example_fn: `(views, y) -> (grads, losses, predictions)` with one
        `[rows, *var_shape]` gradient per variable; with `example_weights`,
        `(views, y, weights)`.
      variables: The trainable variables, in the order of the gradients.
      views: [batch, K, *input_shape] inputs (or a list or dict of them).
      y: [batch, ...] labels (or a list of them, one per model output).
      mask: [batch] weights; rows <= 0 are padding.
      l2_norm_clip: C > 0.
      size: Examples per chunk (from `chunk_size`); None does the whole
        micro-batch at once.
      example_weights: Optional [batch] weights of each example's loss
        (sample and class weights), handed to `per_example_fn` chunk by
        chunk: they act before clipping.
      num_outputs: How many tensors the predictions hold (the model's
        outputs).

    Returns:
      (clipped, losses, predictions) for the whole micro-batch, equal to
      `clipping.clip_and_sum` on its unchunked per-example gradients.
    """

    def compute(views, y, weights):
        if weights is None:
            return per_example_fn(views, y)
        return per_example_fn(views, y, weights)

    if size is None:
        grads, losses, preds = compute(views, y, example_weights)
        return clipping.clip_and_sum(grads, l2_norm_clip, mask), losses, preds

    first_label = tf.nest.flatten(y)[0]
    batch = tf.shape(first_label)[0]
    if first_label.shape[0] is None:
        # A run-time micro-batch smaller than the chunk is one chunk of its
        # own size: padding it up to the chunk would compute the padding rows
        # (tens of thousands of them under a large "auto" limit).
        size = tf.maximum(tf.minimum(size, batch), 1)
    num_chunks = (batch + size - 1) // size
    pad = num_chunks * size - batch

    # Padding rows are masked out: they contribute exactly 0 to every sum.
    def chunked(structure):
        return tf.nest.map_structure(
            lambda t: _split(_pad_rows(t, pad), num_chunks, size), structure
        )

    chunked_views = chunked(views)
    chunked_y = chunked(y)
    chunked_mask = _split(_pad_rows(tf.cast(mask, tf.float32), pad), num_chunks, size)
    chunked_weights = None
    if example_weights is not None:
        chunked_weights = _split(
            _pad_rows(tf.cast(example_weights, tf.float32), pad), num_chunks, size
        )

    # The predictions' structure (one tensor per model output), learnt as the
    # loop body is traced, to pack them again after the loop.
    prediction_structure = []

    def body(i, sums, counts, arrays):
        weights = None if chunked_weights is None else chunked_weights[i]
        grads, losses, preds = compute(
            tf.nest.map_structure(lambda t: t[i], chunked_views),
            tf.nest.map_structure(lambda t: t[i], chunked_y),
            weights,
        )
        prediction_structure[:] = [preds]
        clipped = clipping.clip_and_sum(grads, l2_norm_clip, chunked_mask[i])
        sums = [s + g for s, g in zip(sums, clipped.grad_sum)]
        counts = counts + tf.stack(
            [clipped.num_clipped, clipped.num_nonfinite, clipped.num_examples]
        )
        values = (
            clipped.norms,
            clipped.kept,
            tf.cast(losses, tf.float32),
            *(tf.cast(p, tf.float32) for p in tf.nest.flatten(preds)),
        )
        arrays = tuple(a.write(i, v) for a, v in zip(arrays, values))
        return i + 1, sums, counts, arrays

    arrays = tuple(
        tf.TensorArray(dtype, size=num_chunks)
        for dtype in (tf.float32, tf.bool, tf.float32) + (tf.float32,) * num_outputs
    )
    _, sums, counts, arrays = tf.while_loop(
        lambda i, *_: i < num_chunks,
        body,
        (
            tf.constant(0),
            [tf.zeros(v.shape, tf.float32) for v in variables],
            tf.zeros([3], tf.float32),
            arrays,
        ),
        parallel_iterations=1,
    )
    norms, kept, losses, *flat_preds = (_merge(a.stack(), batch) for a in arrays)
    static_batch = first_label.shape[0]
    for t in (norms, kept, losses, *flat_preds):
        t.set_shape([static_batch] + t.shape.as_list()[1:])
    if prediction_structure:
        preds = tf.nest.pack_sequence_as(prediction_structure[0], flat_preds)
    else:  # eager and no chunk ran (an empty batch)
        preds = flat_preds[0] if num_outputs == 1 else flat_preds
    clipped = ClippedSum(
        grad_sum=sums,
        norms=norms,
        num_clipped=counts[0],
        num_nonfinite=counts[1],
        num_examples=counts[2],
        kept=kept,
    )
    return clipped, losses, preds
