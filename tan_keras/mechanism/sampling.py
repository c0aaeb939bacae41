"""Poisson sampling as a `tf.data` pipeline, with static shapes for XLA/TPU.

The accountant's guarantee assumes Poisson sampling: at every logical step
each of the N examples is included independently with probability q = B/N.
Shuffled fixed-size batches do not satisfy it (audits measured 4-10x gaps).

Static shapes: a logical batch has a random size n ~ Binomial(N, q). It is cut
into micro-batches of a fixed physical size P, the last one padded; a `mask`
marks real rows (padding contributes exactly nothing) and `step_end` marks (on every row) the
last micro-batch of the step. A large sample is never truncated: it spills
into extra micro-batches of the same logical step. An empty sample is a valid
step (one all-padding micro-batch: the update is pure noise). With the default
P = B + 4 sqrt(B (1 - q)), a step needs a second micro-batch with probability
about 3e-5, so almost all compute goes to real rows.

With a smaller P (the paper's recipes: P = 256 for B = 4096) the number of
micro-batches of a step follows its realized size n, and so would anything
that counts them: the updates done per Keras epoch, their epsilon, the time
per step. n depends on which examples are in the data, and nothing noises
it. Every sampler (`pad_steps`, on unless it changes nothing) pads every
step to the same number of micro-batches, enough for n <= B + 4 sqrt(B (1 -
q)): the layout then depends on n only in that 3e-5 tail, for a few percent
more padded rows.

Secrecy: amplification by sampling assumes nobody knows which examples were
sampled, so the sampling RNG, like the noise RNG, is seeded from OS entropy
unless a seed is given explicitly (debugging only; a warning says so).
"""

import contextlib
import gc
import hashlib
import math
import secrets
import warnings
import weakref
from typing import Callable, List, Optional, Tuple

import numpy as np
import tensorflow as tf
from scipy import stats

from tan_keras import _repeated_rows, _validate
from tan_keras.mechanism import content_digest, data_copies, views
from tan_keras.mechanism.noise import NotPrivateWarning, entropy_int64

SEEDED_SAMPLER_WARNING = (
    "The Poisson sampler was given an explicit seed ({seed}). Privacy amplification "
    "by sampling assumes the batches are secret; anyone who knows this seed knows "
    "them, and the reported epsilon does not hold against them. Debugging only."
)


def default_physical_batch_size(expected_batch_size: int, dataset_size: int) -> int:
    """Physical micro-batch size P = B + 4 std of the Poisson batch size (<= N).

    Args:
      expected_batch_size: B.
      dataset_size: N.

    Returns:
      P, so that a logical step spills into a second micro-batch with
      probability about 3e-5.
    """
    q = expected_batch_size / dataset_size
    std = math.sqrt(expected_batch_size * (1.0 - q))
    return min(dataset_size, expected_batch_size + int(math.ceil(4.0 * std)))


def mean_micro_batches(sampler: "PoissonSampler") -> float:
    """E[micro-batches of one logical step] under `sampler`'s Poisson batch sizes.

    Args:
      sampler: A `PoissonSampler`.

    Returns:
      The mean over n ~ Binomial(N, q) of max(ceil(n / P), least), where least
      is `steps_padded_to` (or 1): what a Keras epoch of micro-batches must
      hold for its logical steps to average N / B examples.
    """
    size = sampler.physical_batch_size
    least = sampler.steps_padded_to or 1
    n = np.arange(sampler.dataset_size + 1)
    probabilities = stats.binom.pmf(n, sampler.dataset_size, sampler.sampling_rate)
    return float(np.sum(probabilities * np.maximum(-(-n // size), least)))


class PoissonSampler(tf.Module):
    """Draws Poisson-sampled logical batches of example indices.

    Its state (secret key, step counter) is made of variables: put the
    sampler in a `tf.train.Checkpoint` and call `resume_at` after restoring.

    Args:
      dataset_size: N, the number of distinct training examples.
      expected_batch_size: B; q = B / N.
      physical_batch_size: P, rows per micro-batch (static shape). Defaults to
        `default_physical_batch_size(B, N)`.
      seed: None (default) seeds from OS entropy; an integer makes sampling
        reproducible and warns that the batches are then not secret.
      secret_key: For multi-worker training, where every worker must draw the
        SAME global batches: a 64-bit key from `new_secret_key()` on one host,
        passed to the others over a private channel (never a constant in
        code or flags that others can read).
      pad_steps: Pad every logical step to `steps_padded_to` micro-batches
        (see the module docstring), so that the micro-batches per step do not
        reveal the realized batch size; a larger step still spills into
        more. None (default) or True. False (ceil(n / P) micro-batches) only
        where it changes nothing: P >= B + 4 std, one micro-batch a step.

    Raises:
      ValueError: on an invalid argument.
    """

    def __init__(
        self,
        dataset_size: int,
        expected_batch_size: int,
        physical_batch_size: Optional[int] = None,
        seed: Optional[int] = None,
        secret_key: Optional[int] = None,
        pad_steps: Optional[bool] = None,
    ):
        super().__init__(name="poisson_sampler")
        self.dataset_size = _validate.positive_int("dataset_size", dataset_size)
        self.expected_batch_size = _validate.integer(
            "expected_batch_size", expected_batch_size, low=1, high=self.dataset_size
        )
        if physical_batch_size is None:
            physical_batch_size = default_physical_batch_size(
                self.expected_batch_size, self.dataset_size
            )
        self.physical_batch_size = _validate.positive_int(
            "physical_batch_size", physical_batch_size
        )
        if pad_steps is not None and not isinstance(pad_steps, bool):
            raise _validate.invalid("pad_steps", "None, True or False", pad_steps)
        padded_rows = default_physical_batch_size(self.expected_batch_size, self.dataset_size)
        if pad_steps is False and self.physical_batch_size < padded_rows:
            # Unpadded, a step's micro-batches would count its realized size n
            # (ceil(n / P)): Keras's progress bar, the batch callbacks and the
            # updates per epoch would release it without noise (review round 8).
            raise _validate.invalid(
                "pad_steps",
                f"True or None when physical_batch_size ({self.physical_batch_size}) is "
                f"below B + 4 std ({padded_rows} rows): unpadded, the number of "
                "micro-batches of a step is ceil(n / P) for its realized batch size n, "
                "which Keras's progress bar, the batch callbacks and the updates counted "
                "per epoch would release without noise",
                pad_steps,
            )
        self.pad_steps = pad_steps is not False
        if seed is not None and secret_key is not None:
            raise _validate.invalid(
                "secret_key", "None when `seed` is given (they are alternatives)", secret_key
            )
        # Whether a restored checkpoint may give it a fresh key (DPCheckpoint):
        # not when other hosts share it, nor when the caller chose a seed.
        self.key_is_secret_and_local = secret_key is None and seed is None
        if secret_key is not None:
            key = _validate.integer("secret_key", secret_key, low=0, high=2**64 - 1) - 2**63
            if secret_key < 2**32:
                # A key of `new_secret_key()` is below 2**32 with chance 2**-32:
                # this one was typed (a review passed secret_key=1 unwarned).
                warnings.warn(
                    f"The sampling key {secret_key} is a small constant, not a key from "
                    "PoissonSampler.new_secret_key(): anyone who knows it can tell which "
                    "examples each step holds, and the amplified epsilon reported does not "
                    "hold against them. Use a small key for debugging only.",
                    NotPrivateWarning,
                    stacklevel=2,
                )
        elif seed is None:
            key = entropy_int64()
        else:
            key = _validate.integer("seed", seed, low=0, high=2**63 - 1)
            warnings.warn(SEEDED_SAMPLER_WARNING.format(seed=seed), NotPrivateWarning, stacklevel=2)
        # Step t's batch is a pure function of (key, t): a resumed run sets the
        # counter to its number of completed updates and sees exactly the
        # batches an uninterrupted run would have seen, while re-iterating the
        # dataset continues the counter and never replays a batch.
        self.key = tf.Variable(key, dtype=tf.int64, trainable=False, name="key")
        self.next_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="next_step")
        # Steps read ahead eagerly (`sample_indices`): drawn, for `resume_at`.
        self._revealed = 0

    @property
    def source_id(self) -> tf.Tensor:
        """The stream id of this sampler's micro-batches not bound to a source (`stream_id`)."""
        return self.stream_id(None)

    def stream_id(self, source: Optional[int] = None) -> tf.Tensor:
        """A public int64 naming the stream of micro-batches this sampler draws over `source`.

        A pseudo-random function of the secret key and the source's
        fingerprint (Philox on its own stream), so it says nothing about the
        key or the batches; all hosts sharing the key and the data agree on
        it. Two pipelines over different data (`x` and `-x`) with one key
        are two streams. The model checks that every micro-batch of a
        logical step comes from one stream, and that every micro-batch of a
        fit comes from the stream `fit` pinned before the first step.

        Args:
          source: `source_fingerprint` of the data the pipeline samples, or
            None for a pipeline that binds none.

        Returns:
          A scalar int64 whose low bits are `STREAM_MARK` (see `is_pipeline_stream`).
        """
        seed = tf.stack([self.key, tf.constant(_SOURCE_STREAM, tf.int64)])
        if source is not None:
            source = _validate.integer("source", source, low=-(2**63), high=2**63 - 1)
            seed = tf.random.experimental.stateless_fold_in(seed, tf.constant(source, tf.int64))
        value = tf.random.stateless_uniform([], seed, minval=None, maxval=None, dtype=tf.int64)
        mark = tf.constant(STREAM_MARK, tf.int64)
        return tf.bitwise.bitwise_or(tf.bitwise.bitwise_and(value, ~_STREAM_MARK_MASK), mark)

    def _identity(self, step: tf.Tensor, num_micro: tf.Tensor, source=None) -> tf.Tensor:
        """[num_micro, P, 9] int64: each row's identity (`IDENTITY_COLUMNS`), content 0."""
        size = self.physical_batch_size
        micro = tf.range(num_micro, dtype=tf.int64)[:, None]
        row = tf.range(size, dtype=tf.int64)[None, :]
        shape = [num_micro, size]

        def fill(value):
            return tf.fill(shape, tf.cast(value, tf.int64))

        columns = [
            fill(step),
            micro + tf.zeros_like(row),
            fill(num_micro),
            fill(self.dataset_size),
            fill(self.expected_batch_size),
            fill(self.stream_id(source)),
            row + tf.zeros_like(micro),
            fill(size),
            fill(0),
        ]
        return tf.stack(columns, axis=-1)

    @staticmethod
    def new_secret_key() -> int:
        """A fresh 64-bit sampling key from OS entropy (see `secret_key`)."""
        return secrets.randbits(64)

    @property
    def sampling_rate(self) -> float:
        """q = B / N."""
        return self.expected_batch_size / self.dataset_size

    @property
    def steps_padded_to(self) -> Optional[int]:
        """With pad_steps: the micro-batches of every step up to B + 4 std rows, else None."""
        if not self.pad_steps:
            return None
        rows = default_physical_batch_size(self.expected_batch_size, self.dataset_size)
        return -(-rows // self.physical_batch_size)

    def resume_at(self, step: int, keep_key: bool = False) -> None:
        """Makes the next logical batch the one of step `step` (0-based).

        Call it after restoring a checkpoint, with the number of noisy updates
        already applied (`model.dp_steps`): batches drawn ahead by the input
        pipeline but never applied are drawn again, applied ones never are.

        Going back to a step this sampler has drawn already (a second `fit`
        on the same pipeline after its prefetch drew ahead, a pipeline read
        ahead by other code, a second model fed from the same pipeline)
        gives a secret, local key a fresh value from OS entropy first: the
        steps drawn again are new, independent Poisson draws, so no batch
        that code outside the model has seen can be chosen for an update
        (review round 8: one-step fits choosing, step by step, the one of
        two pipelines whose next batch held a target example), and no two
        models train on the same batches. Moving forward keeps the key, so
        a restored run resumes exactly. A shared key (`secret_key`, all
        hosts must agree) or a seed is kept: their batches are reproducible
        by design.

        Args:
          step: Number of logical steps already applied.
          keep_key: Keep the key even when going back
            (`DPCheckpoint.restore(exact_resume=True)`).

        Raises:
          ValueError: if `step` is not an integer >= 0.
        """
        step = _validate.integer("step", step, low=0)
        if not isinstance(keep_key, bool):
            raise _validate.invalid("keep_key", "True or False", keep_key)
        drawn = max(int(self.next_step.numpy()), self._revealed)
        if step < drawn and self.key_is_secret_and_local and not keep_key:
            self.key.assign(entropy_int64())
            self._revealed = 0
        self.next_step.assign(step)

    def sample_indices(self, step) -> tf.Tensor:
        """Draws the logical batch of step `step`: each index kept with prob. q.

        Args:
          step: Scalar int64 step index.

        Called eagerly (code outside a pipeline reading a batch ahead), the
        step counts as drawn: a `resume_at` back to it gives a fresh key.

        Returns:
          A 1-D int64 tensor of the selected indices (in increasing order).
        """
        if tf.executing_eagerly():
            self._revealed = max(self._revealed, int(step) + 1)
        seed = tf.stack([self.key, tf.cast(step, tf.int64)])
        uniform = tf.random.stateless_uniform([self.dataset_size], seed=seed, dtype=tf.float64)
        return tf.where(uniform < self.sampling_rate)[:, 0]

    def micro_batches(
        self, steps: Optional[int] = None, with_seeds: bool = False, source: Optional[int] = None
    ) -> tf.data.Dataset:
        """Logical steps cut into padded micro-batches.

        Args:
          steps: Number of logical steps per iteration of the dataset; None
            for an endless dataset. Each iteration draws fresh batches (the
            RNG state carries on), so `fit(..., epochs=E)` sees E * steps
            different logical batches.
          with_seeds: Also give each micro-batch its step's [2] int64 key
            for the augmentations, a function of the sampler's key and the
            step; each view is then keyed by (that key, its example, its
            view) (`views.ViewKeys`), so a resumed run and every host draw
            the same views.
          source: `source_fingerprint` of the data the micro-batches will
            gather, bound into their stream id (`stream_id`); None binds none.

        Returns:
          A dataset of `(indices [P] int64, mask [P] float32, step_end [P] bool,
          identity [P, 9] int64, content 0)` (then `seed [2] int64` with `with_seeds`);
          `step_end` is True on every row of a step's last micro-batch, and
          `identity` holds the micro-batch's identity on every row (see
          `IDENTITY_COLUMNS`).

        Raises:
          ValueError: if `steps` is not a positive integer.
        """
        if steps is not None:
            steps = _validate.positive_int("steps", steps)
        size = self.physical_batch_size
        least = self.steps_padded_to or 1

        def split(_):
            step = self.next_step.assign_add(1) - 1
            indices = self.sample_indices(step)
            n = tf.shape(indices, out_type=tf.int64)[0]
            num_micro = tf.maximum(tf.math.floordiv(n + size - 1, size), least)
            padded_len = num_micro * size
            padded = tf.concat([indices, tf.zeros([padded_len - n], tf.int64)], 0)
            mask = tf.cast(tf.range(padded_len) < n, tf.float32)
            # The flag is repeated on every row: a global micro-batch may be
            # split across replicas, and each must know where the step ends.
            step_end = tf.tile((tf.range(num_micro) == num_micro - 1)[:, None], [1, size])
            parts = (
                tf.reshape(padded, [num_micro, size]),
                tf.reshape(mask, [num_micro, size]),
                step_end,
                self._identity(step, num_micro, source),
            )
            if with_seeds:
                # Derived from the key through Philox, apart from the
                # sampling stream (another second word), so the views say
                # nothing about which examples were sampled.
                step_seed = tf.random.experimental.stateless_fold_in(
                    tf.stack([self.key, tf.constant(_AUGMENT_STREAM, tf.int64)]), step
                )
                # Two full-range words for the views' keys (views.ViewKeys).
                step_key = tf.random.stateless_uniform(
                    [2], step_seed, minval=None, maxval=None, dtype=tf.int64
                )
                parts += (tf.tile(step_key[None], [num_micro, 1]),)
            return parts

        ticks = tf.data.Dataset.from_tensors(0).repeat()
        if steps is not None:
            ticks = ticks.take(steps)
        # Sequential map: the step counter is stateful.
        return ticks.map(split).flat_map(lambda *parts: tf.data.Dataset.from_tensor_slices(parts))


# Second seed words of the augmentation stream and of the sampler's public
# stream id (the sampling stream's is the step).
_AUGMENT_STREAM = -(2**62)
_SOURCE_STREAM = -(2**62) + 1

# The low 16 bits of every stream id a sampler draws (`stream_id`): the model
# tells a micro-batch of this package's pipelines from one whose identity was
# built by hand (tests with the package-internal seal) without a table of the
# streams the process made, and requires the former to come from the stream
# `fit` pinned. 48 random bits are left: two streams collide with
# probability ~2**-48.
STREAM_MARK = 0x5A3C
_STREAM_MARK_MASK = 0xFFFF


def is_pipeline_stream(source: tf.Tensor) -> tf.Tensor:
    """Whether int64 stream ids carry `STREAM_MARK` (drawn by a `PoissonSampler`).

    Args:
      source: int64 stream ids (the identity's `source` column).

    Returns:
      A bool tensor of the same shape.
    """
    low = tf.bitwise.bitwise_and(tf.cast(source, tf.int64), _STREAM_MARK_MASK)
    return tf.equal(low, STREAM_MARK)


# The identity every row of a Poisson micro-batch carries, so that it survives
# the split of a micro-batch across replicas and hosts: which logical step it
# belongs to, its index among the step's micro-batches and their number, the
# (N, B) it was drawn for, the sampler's public stream id, and the row's
# position among the micro-batch's rows, and a digest of the row's content
# written by the pipeline that builds the element (`content_digest._seal`).
# `DPKerasModel` checks it against its privacy ledger and the row's content
# before the micro-batch can reach an update (`tan_keras.keras_dp.step_identity`).
IDENTITY_COLUMNS = (
    "step",
    "micro_batch",
    "micro_batches",
    "dataset_size",
    "expected_batch_size",
    "source",
    "row",
    "rows",
    "content",
)


def _lists_as_tuples(structure):
    if isinstance(structure, (list, tuple)):
        return tuple(_lists_as_tuples(item) for item in structure)
    if isinstance(structure, dict):
        return {key: _lists_as_tuples(value) for key, value in structure.items()}
    return structure


def identity_rows(
    step,
    micro_batch,
    micro_batches,
    dataset_size,
    expected_batch_size,
    source,
    rows,
) -> tf.Tensor:
    """[rows, 9] int64: the identity of one micro-batch on each of its rows.

    What the sampler gives each micro-batch (`IDENTITY_COLUMNS`), its
    content digest left 0: only the pipelines that draw the micro-batch seal
    it (`content_digest._seal`), and the model refuses a row without a seal.
    Callers who build their own micro-batches use `sampling="caller_poisson"`.

    Args:
      step: The logical step (scalar).
      micro_batch: Its index within the step.
      micro_batches: The step's number of micro-batches.
      dataset_size: N.
      expected_batch_size: B.
      source: The stream id of the step's micro-batches.
      rows: Rows of the micro-batch (a Python int).

    Returns:
      The identity tensor.
    """
    fixed = tf.cast(
        tf.stack([step, micro_batch, micro_batches, dataset_size, expected_batch_size, source]),
        tf.int64,
    )
    positions = tf.range(rows, dtype=tf.int64)[:, None]
    count = tf.fill([rows, 1], tf.constant(rows, tf.int64))
    identity = tf.concat(
        [tf.tile(fixed[None], [rows, 1]), positions, count, tf.zeros([rows, 1], tf.int64)], axis=1
    )
    return identity


def check_sampling_tags(
    dataset: tf.data.Dataset, dataset_size: int, expected_batch_size: int
) -> tf.data.Dataset:
    """`dataset` with every element's (N, B) checked as it is read.

    The model checks each micro-batch's whole identity before any update;
    this earlier check stops a pipeline built for another sampling at its
    first element, before any computation.

    Args:
      dataset: Elements `(x, y, mask, step_end, identity)` of a Poisson pipeline.
      dataset_size: N the consumer accounts for.
      expected_batch_size: B the consumer accounts for.

    Returns:
      The same elements; iterating raises `tf.errors.InvalidArgumentError`
      at the first element drawn for another (N, B), before it reaches the
      model.
    """
    expected = tf.constant([dataset_size, expected_batch_size], tf.int64)
    message = (
        "This Poisson pipeline was built for another sampling than the model accounts "
        f"for: the model has dataset_size={dataset_size}, expected_batch_size="
        f"{expected_batch_size}; the batch's (dataset_size, expected_batch_size) "
        "follows. The accountant would report the epsilon of the wrong sampling rate. "
        "Build the PoissonSampler with the model's dataset_size and expected_batch_size."
    )

    def check(*element):
        tag = tf.cast(element[4], tf.int64)[:, 3:5]
        matches = tf.reduce_all(tf.equal(tag, expected[None]))
        with tf.control_dependencies(
            [tf.debugging.Assert(matches, [message, tag[:1]], summarize=2)]
        ):
            return tf.nest.map_structure(tf.identity, element)

    return dataset.map(check)


def _rows(argument: str, structure) -> int:
    """The number of rows shared by every array of `structure`."""
    leaves = tf.nest.flatten(structure)
    if not leaves or any(np.ndim(leaf) < 1 for leaf in leaves):
        # A Python list of rows flattens to scalars: it is not a list of inputs.
        raise _validate.invalid(
            argument,
            "an array with one row per example, or a list, tuple or dict of such arrays",
            type(structure).__name__,
            "Convert a Python list of rows with np.asarray first",
        )
    counts = {len(array) for array in leaves}
    if len(counts) != 1:
        raise _validate.invalid(
            argument, "arrays with the same number of rows (one per example)", sorted(counts)
        )
    return counts.pop()


def shard_rows(sampler: PoissonSampler, num_shards: int, shard_index: int) -> Tuple[int, int]:
    """The rows one input pipeline keeps of every global micro-batch.

    Args:
      sampler: The `PoissonSampler` every pipeline draws from.
      num_shards: Pipelines (hosts) sharing each micro-batch, >= 1; must
        divide the physical batch size, or rows would be sampled, accounted
        and never trained on.
      shard_index: This pipeline's shard, in [0, num_shards).

    Returns:
      (begin, rows): this shard keeps rows [begin, begin + rows).

    Raises:
      ValueError: naming the argument, on a bad shard setting.
    """
    num_shards = _validate.positive_int("num_shards", num_shards)
    shard_index = _validate.integer("shard_index", shard_index, low=0, high=num_shards - 1)
    if sampler.physical_batch_size % num_shards:
        raise _validate.invalid(
            "num_shards",
            f"a divisor of physical_batch_size={sampler.physical_batch_size}",
            num_shards,
        )
    rows = sampler.physical_batch_size // num_shards
    return shard_index * rows, rows


def check_dataset_size(sampler: PoissonSampler, feature_rows: int, label_rows: int) -> None:
    """Refuses data whose number of examples is not the sampler's N.

    Raises:
      ValueError: naming `dataset_size`, if either count differs from N.
    """
    if feature_rows != sampler.dataset_size or label_rows != sampler.dataset_size:
        raise _validate.invalid(
            "dataset_size",
            f"the number of training examples ({feature_rows} features, {label_rows} labels)",
            sampler.dataset_size,
            "N must count the distinct training examples, before any repeat or augmentation",
        )


def _padding_zeroed(rows: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """`rows` with the rows where `mask` is 0 replaced by zeros (empty strings)."""
    real = tf.reshape(mask > 0, [-1] + [1] * (rows.shape.rank - 1))
    return tf.where(real, rows, tf.zeros_like(rows))


def make_poisson_dataset(
    features: np.ndarray,
    labels: np.ndarray,
    sampler: PoissonSampler,
    steps: Optional[int] = None,
    augmult: int = 1,
    augmenter: Optional[Callable[[tf.Tensor], tf.Tensor]] = None,
    num_shards: int = 1,
    shard_index: int = 0,
    repeated_rows: str = _repeated_rows.REFUSE,
) -> tf.data.Dataset:
    """The training input of `DPKerasModel.fit` for an in-memory dataset.

    Args:
      features: [N, *input_shape] array of the N distinct training examples,
        or a list or dict of such arrays (one per model input).
      labels: [N, ...] array of labels, or a list or dict of them (one per
        model output).
      sampler: A `PoissonSampler` with `dataset_size == N`.
      steps: Logical steps per iteration (per Keras epoch); None for endless.
      augmult: K views per example; K > 1 yields `[P, K, *input_shape]`.
      augmenter: Optional `images -> images` random augmentation (one view per
        call), e.g. from `tan_keras.make_augmenter`; for structured features
        it receives and returns the whole structure. Without it the K views
        are identical copies.
      num_shards: Number of input pipelines (hosts) sharing each global
        micro-batch; each keeps P / num_shards rows. All shards must use
        samplers with the same key (see `PoissonSampler.secret_key`).
      shard_index: This pipeline's shard, in [0, num_shards).
      repeated_rows: "refuse" (the default): data holding an example twice
        (the same inputs and label) is refused, since each copy would be
        sampled on its own (`tan_keras/_repeated_rows.py`); or
        "distinct_people" when equal records are different people's.

    Returns:
      A dataset of `(x, y, mask, step_end, identity)` micro-batches;
      `identity` holds the micro-batch's identity on every row (see
      `IDENTITY_COLUMNS`).

    Raises:
      ValueError: if sizes disagree, `augmult` < 1, the shards do not
        divide the physical batch size, or an example is given twice.
    """
    augmult = _validate.positive_int("augmult", augmult)
    views.check_augmenter(augmenter)
    begin, rows = shard_rows(sampler, num_shards, shard_index)
    check_dataset_size(sampler, _rows("features", features), _rows("labels", labels))
    _repeated_rows.check(features, labels, repeated_rows)
    # No computation of the run may hold a copy of these rows (data_copies.py).
    data_copies.register_rows(features)
    # tf.data elements hold tuples, not lists (a list of inputs for a
    # multi-input model, as keras.io's structured-data examples pass them).
    features = _lists_as_tuples(tf.nest.map_structure(tf.convert_to_tensor, features))
    labels = _lists_as_tuples(tf.nest.map_structure(tf.convert_to_tensor, labels))
    views.check_augmenter_state(augmenter, tf.nest.map_structure(lambda t: t[0], features), augmult)
    # Bound into the stream id: one key over other data is another stream.
    source = source_fingerprint(features, labels)
    # Bound into every seal: a twin (same key, same data) seals otherwise.
    nonce = pipeline_nonce()

    def gather(indices, mask, step_end, identity, seed=None):
        # Every shard draws the same global micro-batch and keeps its rows, so
        # the hosts together see each sampled example exactly once.
        indices, mask = indices[begin : begin + rows], mask[begin : begin + rows]
        step_end, identity = step_end[begin : begin + rows], identity[begin : begin + rows]
        # Padding rows gather example 0; they are zeroed, so that no function
        # over the micro-batch can reach an example the step did not sample.
        x = tf.nest.map_structure(lambda t: _padding_zeroed(tf.gather(t, indices), mask), features)
        # Views keyed by (step key, example, view): whichever shard holds an
        # example draws the same views for it.
        x = views.sampled_views(x, augmult, augmenter, seed=seed, example_ids=indices)
        y = tf.nest.map_structure(lambda t: _padding_zeroed(tf.gather(t, indices), mask), labels)
        return x, y, mask, step_end, content_digest._seal((x, y, mask), identity, nonce)

    dataset = sampler.micro_batches(steps, with_seeds=augmenter is not None, source=source)
    dataset = dataset.map(gather).prefetch(2)
    # The rows are sharded above; tf.distribute must not shard again by
    # whole micro-batches (that would split logical steps across hosts).
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return register_sampler(dataset.with_options(options), sampler, source=source, nonce=nonce)


def source_fingerprint(features, labels) -> int:
    """A 64-bit fingerprint of the examples a pipeline samples from (bound into its stream id).

    Read from every value: each leaf's structure position, dtype and shape,
    and TensorFlow's farmhash fingerprint of each of its rows (strings
    included), so every host holding the same arrays computes the same
    value, and other data (`-x` for `x`, another label column) another one.
    One pass over the data, in C++ (well under a second for CIFAR-10).

    Args:
      features: The structure of [N, ...] tensors or arrays a pipeline gathers from.
      labels: Its labels, likewise.

    Returns:
      A signed 64-bit integer.
    """
    digest = hashlib.blake2b(digest_size=8, person=b"tan-source")
    for structure in (features, labels):
        digest.update(repr(tf.nest.map_structure(lambda _: 0, structure)).encode())
        for leaf in tf.nest.flatten(structure):
            leaf = tf.convert_to_tensor(leaf)
            digest.update(f"{leaf.dtype.name}{leaf.shape.as_list()}".encode())
            rows = tf.reshape(leaf, [tf.shape(leaf)[0], -1])
            digest.update(tf.fingerprint(rows).numpy().tobytes())
    return int.from_bytes(digest.digest(), "little", signed=True)


# Poisson pipelines made here -> the sampler that draws their micro-batches,
# the fingerprint of the data they sample (None: not bound), and the nonce
# their seals are bound to (`pipeline_nonce`).
_SAMPLER_OF = weakref.WeakKeyDictionary()
_SOURCE_OF = weakref.WeakKeyDictionary()
_NONCE_OF = weakref.WeakKeyDictionary()
# While a distributed dataset builds its hosts' pipelines in this process:
# the nonce they all share (`distribute_host_datasets`).
_SHARED_NONCE = []


def pipeline_nonce() -> int:
    """A fresh nonce for a pipeline's seals (`content_digest._seal`), never 0.

    A stream id names the key and the data only (every host of a
    multi-worker run computes it alike), so two pipelines with one key over
    the same data (other augmenters, other shards) carry the same one; a
    generator could then take each step from the twin that suits it, every
    element intact. Each pipeline seals its elements with its own nonce and
    the model checks them with the nonce of the pipeline `fit` pinned
    (`pinned_nonce`): a twin's elements do not match. The pipelines a
    distributed dataset builds in one process share one
    (`distribute_host_datasets`).
    """
    if _SHARED_NONCE:
        return _SHARED_NONCE[-1]
    return secrets.randbits(62) + 1


@contextlib.contextmanager
def _shared_nonce(nonce: int):
    _SHARED_NONCE.append(nonce)
    try:
        yield
    finally:
        _SHARED_NONCE.pop()


def register_sampler(
    dataset: tf.data.Dataset,
    sampler: PoissonSampler,
    source: Optional[int] = None,
    nonce: int = 0,
) -> tf.data.Dataset:
    """Records that `sampler` draws `dataset`'s micro-batches (see `sampler_of`); returns it.

    Args:
      dataset: A pipeline of Poisson micro-batches.
      sampler: The `PoissonSampler` that draws them.
      source: The `source_fingerprint` its micro-batches' stream id is bound
        to (`sampler.micro_batches(source=...)`), or None.
      nonce: The `pipeline_nonce` its elements are sealed with.

    Returns:
      `dataset`, now one of the live pipelines `fit` can pin (`stream_of`,
      `live_pipelines`).
    """
    _SAMPLER_OF[dataset] = sampler
    _SOURCE_OF[dataset] = source
    _NONCE_OF[dataset] = nonce
    return dataset


def stream_of(pipeline: tf.data.Dataset) -> int:
    """The stream id a registered pipeline's micro-batches carry now (its sampler's current key).

    Raises:
      KeyError: if `pipeline` was not registered (`register_sampler`).
    """
    return int(_SAMPLER_OF[pipeline].stream_id(_SOURCE_OF.get(pipeline)).numpy())


def nonce_of(pipeline: tf.data.Dataset) -> int:
    """The nonce a registered pipeline seals its elements with (`pipeline_nonce`; 0: none)."""
    return _NONCE_OF.get(pipeline, 0)


def live_pipelines(dataset_size: int, expected_batch_size: int) -> List[tf.data.Dataset]:
    """The registered Poisson pipelines still alive that draw for (N, B), oldest first.

    Garbage is collected first: a pipeline nothing refers to any more
    (the iterator of a generator holds its pipeline) does not count.
    """

    def matching():
        return [
            pipeline
            for pipeline, sampler in list(_SAMPLER_OF.items())
            if (sampler.dataset_size, sampler.expected_batch_size)
            == (dataset_size, expected_batch_size)
        ]

    # A collection only when there is something it could drop (it is slow).
    if not matching():
        return []
    gc.collect()
    return matching()


def live_pipelines_uncollected() -> List[tf.data.Dataset]:
    """The registered pipelines not yet collected, oldest first (no garbage collection)."""
    return [pipeline for pipeline, _ in list(_SAMPLER_OF.items())]


def sampler_of(dataset) -> Optional[PoissonSampler]:
    """The `PoissonSampler` that draws a dataset's micro-batches, or None.

    Found through the transformations applied after `make_poisson_dataset`
    (`prefetch`, `cache`...): `DPKerasModel.fit` resumes it at the privacy
    ledger's position before reading, so that a pipeline read again (a
    second `fit`, a new epoch's iterator) continues where the released
    updates stopped.
    """
    source = poisson_source(dataset)
    return None if source is None else source[0]


# Transformations that only select, order, repeat or regroup whole elements
# without looking at their data (what they may get wrong, the model's identity
# check catches); any other, a `map` above all, could compute across the rows
# of a micro-batch. `filter` and `take_while` are not among them: a predicate
# over a micro-batch decides from its data whether training goes on, and a
# step the identity check refuses is only refused after the updates before it.
_ELEMENT_TRANSFORMATIONS = frozenset(
    {
        "Prefetch",
        "Options",
        "Repeat",
        "Take",
        "Skip",
        "Cache",
        "Shuffle",
        "Shard",
        "Unbatch",
        "Rebatch",
        "Restructured",
        "Concatenate",
        "AssertCardinality",
        "DirectedInterleave",
        "IgnoreErrors",
        "Variant",
    }
)


def poisson_source(dataset) -> Optional[Tuple[PoissonSampler, List[str]]]:
    """(sampler, transformations) of a pipeline made by `make_poisson_dataset`, or None.

    Every branch upstream of `dataset` is walked, not only the first that
    reaches a Poisson pipeline: in `p.take(2).map(f).concatenate(p)` the
    mapped branch counts as much as the plain one.

    Args:
      dataset: A `tf.data.Dataset`.

    Returns:
      None when no Poisson pipeline of this package is found upstream;
      else its sampler (the first found) and the names of every
      transformation between `dataset` and the Poisson pipelines, on any
      branch, outermost first (e.g. ["Prefetch", "Map"]; tf.data's class
      names without underscores and "Dataset").
    """
    pipelines, transformations = _upstream(dataset)
    if not pipelines:
        return None
    return _SAMPLER_OF[pipelines[0]], transformations


def poisson_pipelines(dataset) -> List[tf.data.Dataset]:
    """The registered Poisson pipelines upstream of `dataset` (itself included), first found first.

    Args:
      dataset: Anything `fit` accepts as `x`; a `tf.data.Dataset`, or a
        distributed dataset from `distribute_host_datasets` (the pipelines
        of this process's hosts), can have pipelines upstream.

    Returns:
      The pipelines (see `stream_of`), every branch walked; empty for
      anything else.
    """
    if isinstance(dataset, tf.data.Dataset):
        return _upstream(dataset)[0]
    try:
        return list(_DISTRIBUTED_PIPELINES.get(dataset, ()))
    except TypeError:  # not weak-referenceable: not one of ours
        return []


def _upstream(dataset) -> Tuple[List[tf.data.Dataset], List[str]]:
    """(registered pipelines, transformations) upstream of `dataset` (see `poisson_source`)."""
    pending = [dataset]
    seen = set()
    found, transformations = [], []
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        try:
            sampler = _SAMPLER_OF.get(current)
        except TypeError:  # not weak-referenceable: not a dataset of ours
            sampler = None
        if sampler is not None:
            found.append(current)
            continue
        name = type(current).__name__.strip("_").removesuffix("Dataset")
        transformations.append(name)
        # tf.data's (private, stable since TF 2.0) list of a dataset's inputs.
        inputs = getattr(current, "_inputs", None)
        if callable(inputs):
            try:
                pending.extend(inputs())
            except (TypeError, ValueError, NotImplementedError):
                continue
    return found, transformations


def check_transformations(transformations: List[str]) -> None:
    """Refuses what was applied to a Poisson pipeline that could mix its rows.

    Args:
      transformations: From `poisson_source`.

    Raises:
      ValueError: naming `x` and the first transformation that is not an
        element selection (e.g. a `map`, a `zip`).
    """
    for name in transformations:
        if name not in _ELEMENT_TRANSFORMATIONS:
            raise _validate.invalid(
                "x",
                "a make_poisson_dataset pipeline with nothing applied to it but element "
                "selections (prefetch, repeat, take...)",
                f"a pipeline transformed by {name}",
                "A function over a whole micro-batch (a map, a zip of two pipelines) can mix "
                "its examples (mix-up, batch standardization) before clipping. Transform "
                "features and labels as arrays before make_poisson_dataset, and pass random "
                "or per-example transformations as its augmenter=, which is called on one "
                "example at a time",
            )


# Distributed Poisson datasets made here -> the (N, B) their samplers draw for,
# and the pipelines their hosts in this process read.
_DISTRIBUTED_SAMPLING = weakref.WeakKeyDictionary()
_DISTRIBUTED_PIPELINES = weakref.WeakKeyDictionary()


def host_dataset_fn(
    sampler_fn: Callable[[], PoissonSampler],
    make_host_dataset: Callable[[PoissonSampler, int, int], tf.data.Dataset],
) -> Callable[[tf.distribute.InputContext], tf.data.Dataset]:
    """Per-host input for `distribute_datasets_from_function`, from any host pipeline.

    Every host builds its pipeline with `make_host_dataset(sampler, hosts,
    host_index)` (elements `(x, y, mask, step_end, identity)` holding this host's
    P / hosts rows of each global micro-batch, drawn with the shared key) and
    hands its L local replicas L consecutive slices of each element
    (tf.distribute feeds a host's replicas round-robin). So the R = W * L
    replicas together hold each sampled example exactly once, and they all
    agree on where each logical step ends.

    Args:
      sampler_fn: Builds this host's `PoissonSampler` (same key on all hosts).
      make_host_dataset: (sampler, num_shards, shard_index) -> the host's
        dataset, e.g. `make_poisson_dataset` with those arguments.

    Returns:
      A function from `tf.distribute.InputContext` to the host's dataset.
    """

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        sampler = sampler_fn()
        hosts = context.num_input_pipelines
        local = context.num_replicas_in_sync // hosts
        rows = sampler.physical_batch_size // hosts
        if sampler.physical_batch_size % hosts or rows % local:
            raise _validate.invalid(
                "physical_batch_size",
                f"a multiple of the {context.num_replicas_in_sync} replicas",
                sampler.physical_batch_size,
            )
        dataset = make_host_dataset(sampler, hosts, context.input_pipeline_id)

        def split(*batch):
            return tf.data.Dataset.from_tensor_slices(
                tf.nest.map_structure(
                    lambda t: tf.reshape(t, [local, rows // local, *t.shape[1:]]), batch
                )
            )

        return dataset.flat_map(split)

    return dataset_fn


def distribute_host_datasets(
    strategy: tf.distribute.Strategy,
    sampler_fn: Callable[[], PoissonSampler],
    make_host_dataset: Callable[[PoissonSampler, int, int], tf.data.Dataset],
):
    """A distributed dataset of per-host pipelines (see `host_dataset_fn`) for `fit`.

    Each element's sampling tag is checked on its host; `DPKerasModel.fit`
    checks the sampler's (N, B) against the model's.

    Args:
      strategy: The `tf.distribute` strategy the model was built under.
      sampler_fn: Builds a host's `PoissonSampler` (same key on all hosts).
      make_host_dataset: As for `host_dataset_fn`.

    Returns:
      A `tf.distribute.DistributedDataset`.
    """
    probe = sampler_fn()
    sampling = (probe.dataset_size, probe.expected_batch_size)
    make = host_dataset_fn(sampler_fn, make_host_dataset)
    pipelines = []

    # One nonce for the pipelines this dataset builds in this process: fit
    # pins one of them, and each replica reads whichever this process built.
    nonce = pipeline_nonce()

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        with _shared_nonce(nonce):
            host = make(context)
        # The pipelines this process's hosts read, whose stream fit pins.
        pipelines.extend(poisson_pipelines(host))
        return check_sampling_tags(host, *sampling)

    dataset = strategy.distribute_datasets_from_function(dataset_fn)
    _DISTRIBUTED_SAMPLING[dataset] = sampling
    _DISTRIBUTED_PIPELINES[dataset] = pipelines
    return dataset


def _in_memory_host(features, labels, augmult, augmenter):
    def make(sampler: PoissonSampler, hosts: int, host: int) -> tf.data.Dataset:
        return make_poisson_dataset(
            features,
            labels,
            sampler,
            augmult=augmult,
            augmenter=augmenter,
            num_shards=hosts,
            shard_index=host,
        )

    return make


def poisson_dataset_fn(
    features: np.ndarray,
    labels: np.ndarray,
    sampler_fn: Callable[[], PoissonSampler],
    augmult: int = 1,
    augmenter: Optional[Callable[[tf.Tensor], tf.Tensor]] = None,
) -> Callable[[tf.distribute.InputContext], tf.data.Dataset]:
    """Per-host in-memory input for `distribute_datasets_from_function`.

    `host_dataset_fn` with `make_poisson_dataset` as each host's pipeline;
    `distribute_poisson_dataset` wraps it for `DPKerasModel.fit`.

    Args:
      features: [N, *input_shape] training examples (on every host).
      labels: [N, ...] labels.
      sampler_fn: Builds this host's `PoissonSampler` (same key on all hosts).
      augmult: K views per example.
      augmenter: Optional one-view augmentation.

    Returns:
      A function from `tf.distribute.InputContext` to the host's dataset.
    """
    return host_dataset_fn(sampler_fn, _in_memory_host(features, labels, augmult, augmenter))


def distribute_poisson_dataset(
    strategy: tf.distribute.Strategy,
    features: np.ndarray,
    labels: np.ndarray,
    sampler_fn: Callable[[], PoissonSampler],
    augmult: int = 1,
    augmenter: Optional[Callable[[tf.Tensor], tf.Tensor]] = None,
):
    """Per-host Poisson input for multi-worker `fit` (see `poisson_dataset_fn`).

    Every host builds its own pipeline from `sampler_fn` (same secret key on
    all hosts), so no host ships its data to another.

    Args:
      strategy: The `tf.distribute` strategy the model was built under.
      features, labels, sampler_fn, augmult, augmenter: As for
        `poisson_dataset_fn`.

    Returns:
      A `tf.distribute.DistributedDataset` to pass to `fit`.
    """
    return distribute_host_datasets(
        strategy, sampler_fn, _in_memory_host(features, labels, augmult, augmenter)
    )


def distributed_sampling(dataset) -> Optional[Tuple[int, int]]:
    """(N, B) of a dataset from `distribute_poisson_dataset`, else None."""
    try:
        return _DISTRIBUTED_SAMPLING.get(dataset)
    except TypeError:  # not weak-referenceable: not one of ours
        return None
