"""Input pipelines of the training program: Poisson training batches, test batches.

In-memory datasets (digits, CIFAR) go through
`sampling.make_poisson_dataset`. ImageNet is a lazy random-access view (1.3M
decoded images would not fit in memory), which `make_poisson_dataset` would
try to load whole. Its sampled rows' JPEG bytes are read from the
array_record files in a `tf.numpy_function` (no decoding there), then each
example is decoded once and its K views drawn in a parallel `tf.data` map,
natively on every core (`encoded_train_dataset`); the Poisson sampler, the
micro-batch layout and the views (keyed by step, example and view) are the
same as in memory.
"""

from typing import Any, Callable, Optional

import keras
import numpy as np
import tensorflow as tf

from tan_keras.mechanism import content_digest, sampling
from tan_keras.mechanism.views import make_views, sampled_views


def train_dataset(
    train_x: Any,
    train_y: Any,
    sampler: sampling.PoissonSampler,
    augmult: int,
    augmenter: Optional[Callable[[tf.Tensor], tf.Tensor]],
    per_host: Optional[tf.distribute.Strategy] = None,
) -> tf.data.Dataset:
    """The endless Poisson-sampled training input of `DPKerasModel.fit`.

    Args:
      train_x: [N, H, W, C] images: a numpy array or a lazy array-like view.
      train_y: [N] labels, same kind as `train_x`.
      sampler: The `PoissonSampler` over the N examples.
      augmult: K views per example.
      augmenter: Random one-view augmentation, or None for identical views.
      per_host: Multi-worker: the strategy; the input is then a
        distributed dataset whose per-host pipelines each keep (and, for
        ImageNet, read and decode) their share of every global micro-batch.

    Returns:
      An endless dataset of `(x, y, mask, step_end, identity)` micro-batches, x of
      shape [P, K, H, W, C] (or [P, H, W, C] when K = 1 without augmenter).
    """
    augmenter = _without_autograph(augmenter)
    if per_host is not None and hasattr(train_x, "encoded"):
        # Every host reads and decodes only its own rows of each micro-batch.
        return sampling.distribute_host_datasets(
            per_host,
            lambda: sampler,
            lambda host_sampler, hosts, host: encoded_train_dataset(
                train_x, train_y, host_sampler, augmult, augmenter, hosts, host
            ),
        )
    if per_host is not None:
        return sampling.distribute_poisson_dataset(
            per_host,
            train_x,
            train_y,
            lambda: sampler,
            augmult=augmult,
            augmenter=augmenter,
        )
    if isinstance(train_x, np.ndarray):
        return sampling.make_poisson_dataset(
            train_x, train_y, sampler, steps=None, augmult=augmult, augmenter=augmenter
        )
    if hasattr(train_x, "encoded"):
        return encoded_train_dataset(train_x, train_y, sampler, augmult, augmenter)
    sampling.check_dataset_size(sampler, len(train_x), len(train_y))
    image_shape = tuple(int(d) for d in train_x.shape[1:])

    def read(indices, mask):
        # Real rows come first in a micro-batch; padding rows stay zero (they
        # are masked out and cost no decoding).
        n = int(np.count_nonzero(mask))
        x = np.zeros((len(indices), *image_shape), np.float32)
        y = np.zeros((len(indices),), np.int32)
        if n:
            x[:n] = train_x[indices[:n]]
            y[:n] = train_y[indices[:n]]
        return x, y

    nonce = sampling.pipeline_nonce()

    def gather(indices, mask, step_end, identity, seed=None):
        x, y = tf.numpy_function(read, [indices, mask], [tf.float32, tf.int32], stateful=False)
        x = tf.ensure_shape(x, [sampler.physical_batch_size, *image_shape])
        y = tf.ensure_shape(y, [sampler.physical_batch_size])
        x = sampled_views(x, augmult, augmenter, seed=seed, example_ids=indices)
        return x, y, mask, step_end, content_digest._seal((x, y, mask), identity, nonce)

    return sampling.register_sampler(
        sampler.micro_batches(None, with_seeds=augmenter is not None)
        .map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(2),
        sampler,
        nonce=nonce,
    )


def encoded_train_dataset(
    train_x: Any,
    train_y: Any,
    sampler: sampling.PoissonSampler,
    augmult: int,
    augmenter: Optional[Callable[[tf.Tensor], tf.Tensor]],
    num_shards: int = 1,
    shard_index: int = 0,
) -> tf.data.Dataset:
    """Poisson micro-batches of encoded images, decoded and augmented in parallel.

    The sampled rows' JPEG bytes are read from the random-access source (a
    `tf.numpy_function` that decodes nothing); then each example is decoded
    once (`train_x.decode`) and its K views drawn from it, one example per
    call of a `tf.data` map that runs on every core (deterministic order).

    Args:
      train_x: [N, H, W, C] view with `encoded(indices)` (JPEG bytes) and
        `decode(jpeg)` (one image, TensorFlow ops).
      train_y: [N] labels.
      sampler: The `PoissonSampler`.
      augmult: K views per example.
      augmenter: Random one-view augmentation, or None.
      num_shards: Hosts sharing each global micro-batch (each keeps
        P / num_shards rows), as in `sampling.make_poisson_dataset`.
      shard_index: This host's shard.

    Returns:
      An endless dataset of `(x, y, mask, step_end, identity)` micro-batches, as
      `train_dataset`. An image that cannot be decoded stops it with an
      error naming the example.

    Raises:
      ValueError: if the sampler's N is not the number of examples, or the
        shards do not divide the physical batch size.
    """
    sampling.check_dataset_size(sampler, len(train_x), len(train_y))
    begin, rows = sampling.shard_rows(sampler, num_shards, shard_index)
    augmenter = _without_autograph(augmenter)
    image_shape = tuple(int(d) for d in train_x.shape[1:])

    def read(indices, mask):
        # Real rows come first in a micro-batch; padding rows get no bytes.
        n = int(np.count_nonzero(mask))
        jpegs = np.full(len(indices), b"", dtype=object)
        labels = np.zeros(len(indices), np.int32)
        if n:
            jpegs[:n] = train_x.encoded(indices[:n])
            labels[:n] = np.asarray(train_y[indices[:n]], np.int32)
        return jpegs, labels

    def fetch(indices, mask, step_end, identity, key=None):
        indices, mask = indices[begin : begin + rows], mask[begin : begin + rows]
        step_end, identity = step_end[begin : begin + rows], identity[begin : begin + rows]
        jpegs, labels = tf.numpy_function(
            read, [indices, mask], [tf.string, tf.int32], stateful=False
        )
        keys = tf.zeros([rows, 2], tf.int64) if key is None else tf.tile(key[None], [rows, 1])
        jpegs, labels = tf.ensure_shape(jpegs, [rows]), tf.ensure_shape(labels, [rows])
        return jpegs, labels, indices, mask, step_end, identity, keys

    def example_views(jpeg, label, index, mask, step_end, identity, key):
        # Padding rows (mask 0, no bytes) are zeros; every real row is decoded.
        image = tf.cond(
            mask > 0,
            lambda: _decode(train_x.decode, jpeg, index, image_shape, "training"),
            lambda: tf.zeros(image_shape, tf.float32),
        )
        seed = key if augmenter is not None else None
        views = sampled_views(image[None], augmult, augmenter, seed=seed, example_ids=index[None])
        return views[0], label, mask, step_end, identity

    parallel = dict(num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    nonce = sampling.pipeline_nonce()

    def sealed(x, y, mask, step_end, identity):
        # The rows were decoded one by one; their digest is taken on the batch.
        return x, y, mask, step_end, content_digest._seal((x, y, mask), identity, nonce)

    return sampling.register_sampler(
        sampler.micro_batches(None, with_seeds=augmenter is not None)
        # Reads overlap with decoding; rows are then decoded one example per
        # call on every core, and put back together in order.
        .map(fetch, **parallel)
        .unbatch()
        .map(example_views, **parallel)
        .batch(rows, drop_remainder=True, **parallel)
        .map(sealed)
        .prefetch(2),
        sampler,
        nonce=nonce,
    )


def _decode(decode, jpeg, index, image_shape, split) -> tf.Tensor:
    """`decode(jpeg)`, or an error naming the example if it cannot be decoded.

    A decoding error raised inside the pipeline names neither the example
    nor the fix. Decoding in a one-element dataset that drops errors turns
    it into a flag instead: in the ImageNet input on one core, 2.3 against
    2.2 ms an example without views, within noise of 11.5 ms with K = 8.
    """
    attempt = (
        tf.data.Dataset.from_tensors(jpeg)
        .map(lambda data: (decode(data), True))
        .ignore_errors()
        .concatenate(tf.data.Dataset.from_tensors((tf.zeros(image_shape, tf.float32), False)))
    )
    image, decoded = attempt.take(1).get_single_element()
    refuse = tf.debugging.Assert(
        decoded,
        [
            f"The {split} example at index",
            index,
            "could not be decoded as an image (corrupt, truncated, or not a JPEG, PNG, GIF "
            "or BMP): re-encode it, or leave it out of the dataset (and out of N).",
        ],
    )
    with tf.control_dependencies([refuse]):
        return tf.ensure_shape(tf.identity(image), image_shape)


def _without_autograph(augmenter):
    # The augmentations are straight-line TensorFlow code; autograph would
    # still transpile them on every trace of the
    # pipeline, which measured ~8 s of a CIFAR run's start-up on 2 cores.
    if augmenter is None:
        return None
    return tf.autograph.experimental.do_not_convert(augmenter)


def test_dataset(test_x: Any, test_y: Any, batch_size: int) -> tf.data.Dataset:
    """The test set in order, in batches of `batch_size` (last one smaller).

    Args:
      test_x: [M, H, W, C] images: a numpy array or a lazy array-like view.
      test_y: [M] labels.
      batch_size: Images per batch.

    Returns:
      A finite dataset of `(x, y)` batches.
    """
    image_shape = tuple(int(d) for d in test_x.shape[1:])
    if hasattr(test_x, "encoded"):
        return _encoded_test_dataset(test_x, test_y, batch_size, image_shape)

    def read(indices):
        return (
            np.asarray(test_x[indices], np.float32),
            np.asarray(test_y[indices], np.int32),
        )

    def gather(indices):
        x, y = tf.numpy_function(read, [indices], [tf.float32, tf.int32], stateful=False)
        return tf.ensure_shape(x, [None, *image_shape]), tf.ensure_shape(y, [None])

    return (
        tf.data.Dataset.range(len(test_y))
        .batch(batch_size)
        .map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(2)
    )


def _encoded_test_dataset(test_x, test_y, batch_size, image_shape) -> tf.data.Dataset:
    """`test_dataset` of encoded images: bytes read in order, decoded in parallel."""

    def read(indices):
        return test_x.encoded(indices), np.asarray(test_y[indices], np.int32)

    def fetch(indices):
        jpegs, labels = tf.numpy_function(read, [indices], [tf.string, tf.int32], stateful=False)
        return tf.ensure_shape(jpegs, [None]), tf.ensure_shape(labels, [None]), indices

    def decode(jpeg, label, index):
        return _decode(test_x.decode, jpeg, index, image_shape, "test"), label

    return (
        tf.data.Dataset.range(len(test_y))
        .batch(batch_size)
        .map(fetch)
        .unbatch()
        .map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(batch_size)
        .prefetch(2)
    )


def tta_accuracy(
    model: keras.Model,
    test: tf.data.Dataset,
    views: int,
    augmenter: Callable[[tf.Tensor], tf.Tensor],
) -> float:
    """Test accuracy with test-time augmentation: a majority vote over views.

    Each test image is augmented `views` times; each view votes for its
    predicted class and the most voted class wins (ties go to the class with
    the highest mean probability), as in TAN's ImageNet evaluation.

    Args:
      model: The classifier (logits out).
      test: `(x, y)` batches from `test_dataset`.
      views: Number of augmented views per image, >= 2.
      augmenter: Random one-view augmentation (`tan_keras.make_augmenter`).

    Returns:
      The accuracy of the voted predictions.
    """

    augmenter = _without_autograph(augmenter)

    @tf.function
    def predict(x):
        batched = make_views(x, views, augmenter)  # [b, V, H, W, C]
        flat = tf.reshape(batched, tf.concat([[-1], tf.shape(batched)[2:]], 0))
        logits = model(flat, training=False)
        logits = tf.reshape(logits, [tf.shape(x)[0], views, -1])
        num_classes = tf.shape(logits)[-1]
        votes = tf.reduce_sum(tf.one_hot(tf.argmax(logits, -1), num_classes), axis=1)
        # Mean probabilities are < 1, so they only break ties between votes.
        mean_prob = tf.reduce_mean(tf.nn.softmax(logits), axis=1)
        return tf.argmax(votes + mean_prob, axis=-1, output_type=tf.int32)

    correct = total = 0
    for x, y in test:
        correct += int(tf.reduce_sum(tf.cast(predict(x) == y, tf.int32)))
        total += int(y.shape[0])
    return correct / total
