"""A digest of each row's content, so that a micro-batch's identity vouches for its data.

The identity every Poisson row carries (`sampling.IDENTITY_COLUMNS`) says
which logical step and micro-batch the row belongs to. Without its content it
would survive any function applied between the sampler and the model: a
generator or a `PyDataset` that re-yields the sampler's elements after
blending their rows (mix-up, a batch statistic, another example's features
pasted in) keeps every identity field and changes what reaches the update.
So the pipelines that build Poisson micro-batches finish each element with
`_seal` (package-internal, like `_digest`), which writes a digest of every
row's features, labels and mask into the identity's last column, and the
train step recomputes it on what it received (`matches`): a row whose
content changed after sealing is refused like a replayed step.

The digest reads every value of the row: a polynomial hash modulo the prime
2**31 - 1, evaluated at a point drawn from a secret of this process and the
row's step and micro-batch. Two different contents of n values get the same
digest for at most n of the 2**31 - 1 points, so a change of any value, in
any position, is found with probability at least 1 - n / 2**31 whatever the
change; and since the point is secret, recomputing the digest with this
module's public code does not reproduce a seal (elements sealed in another
process are refused too). There is no public way to seal a micro-batch:
callers who build their own have the `caller_poisson` opt-in, which the
plan and the logs name.

Every leaf is read (a scalar on every row), and so is the element's layout
(each leaf's path, kind and rank): an input added, removed or reshaped after
sealing does not match. A leaf the digest cannot read (a `tf.RaggedTensor`
or `tf.SparseTensor`, which the package's pipelines never build) is refused
when the train step is traced (`step_identity.refuse_unsealable`): content
beside the sealed rows, a micro-batch statistic, would reach the model
unchecked. Each pipeline seals with its own nonce
(`sampling.pipeline_nonce`), and the model checks with the nonce of the
pipeline `fit` pinned: a twin (one key over the same data, another
augmenter) has the same stream id but not the same seals.

Exactness: it is integer arithmetic on 16-bit words of the values (integers
by value, float64 by its 64-bit pattern, other floating values by their
float32 bit pattern, strings by a keyed hash), the same on the host
pipeline and inside an XLA-compiled step on any device. Each row's identity
(step, micro-batch, row, rows, ...) is hashed with its content, so a row
copied to another position or a micro-batch cut short does not match
either. Its cost is a few integer operations per value read: small beside a
forward pass.
"""

import collections.abc
import hashlib
import math
import secrets
import typing
from typing import Any

import tensorflow as tf

# A prime modulus: products of two residues fit in int64.
_PRIME = 2**31 - 1
# This process's secret: the evaluation points derive from it (never saved).
_SECRET = (secrets.randbits(64) % (_PRIME - 1) + 1, secrets.randbits(64) % (_PRIME - 1) + 1)
# The identity column that holds the digest (sampling.IDENTITY_COLUMNS).
COLUMN = 8


def _halves(bits: tf.Tensor) -> tf.Tensor:
    """[rows, 2 * n] int64: the 16-bit halves of int32 bit patterns (exact residues)."""
    bits = tf.cast(bits, tf.int64)
    return tf.concat(
        [
            tf.bitwise.bitwise_and(bits, 0xFFFF),
            tf.bitwise.bitwise_and(tf.bitwise.right_shift(bits, 16), 0xFFFF),
        ],
        axis=1,
    )


def _words(values: tf.Tensor) -> tf.Tensor:
    """[rows, n] -> [rows, m] int64 words below 2**16 that determine `values`.

    Integers by value, exactly (as int64: ids above 2**24 that a cast to
    float32 would merge stay apart, and a pipeline's int64 matches the int32
    a model may receive); float64 by its own 64-bit pattern (a change below
    float32's precision still reaches a float64 model); other floating
    values by their float32 bit pattern (an exact widening); strings by a
    62-bit hash keyed by this process's secret.
    """
    if values.dtype == tf.string:
        values = tf.strings.to_hash_bucket_strong(values, 2**62, key=list(_SECRET))
    if values.dtype == tf.float64:
        pairs = tf.bitcast(values, tf.int32)  # [rows, n, 2]
        return _halves(tf.reshape(pairs, [tf.shape(values)[0], -1]))
    if values.dtype.is_floating:
        return _halves(tf.bitcast(tf.cast(values, tf.float32), tf.int32))
    pairs = tf.bitcast(tf.cast(values, tf.int64), tf.int32)  # [rows, n, 2]
    return _halves(tf.reshape(pairs, [tf.shape(values)[0], -1]))


def _point(step: tf.Tensor, micro_batch: tf.Tensor) -> tf.Tensor:
    """The secret evaluation point in [1, _PRIME) of one micro-batch."""
    first, second = (tf.constant(k, tf.int64) for k in _SECRET)
    value = tf.math.floormod(first + tf.math.floormod(step, _PRIME), _PRIME)
    for addend in (micro_batch, tf.constant(1, tf.int64)):
        # A keyed quadratic round: its output is not affine in its input.
        value = tf.math.floormod(value * value, _PRIME)
        value = tf.math.floormod(value * second + tf.math.floormod(addend, _PRIME) + 1, _PRIME)
    return tf.math.floormod(value, _PRIME - 1) + 1


def _small_powers(base: tf.Tensor, count, bits: int) -> tf.Tensor:
    """[count] int64: base**0, ..., base**(count - 1) modulo _PRIME (square and multiply).

    `bits` bounds the exponents' bit length (few ops for a known small count).
    """
    # The constants are made once: every Python number in an op is a new
    # graph node, and this loop runs in every fit's input and train step.
    prime, one = tf.constant(_PRIME, tf.int64), tf.constant(1, tf.int64)
    exponents = tf.range(count, dtype=tf.int64)
    result = tf.ones_like(exponents)
    for _ in range(bits):
        odd = tf.equal(tf.bitwise.bitwise_and(exponents, one), one)
        result = tf.where(odd, tf.math.floormod(result * base, prime), result)
        base = tf.math.floormod(base * base, prime)
        exponents = tf.bitwise.right_shift(exponents, one)
    return result


def _powers(point: tf.Tensor, count) -> tf.Tensor:
    """[count] int64: point**1, ..., point**count modulo _PRIME.

    As an outer product of two tables of about sqrt(count) powers each, so
    that the cost is one multiplication per value, not one per bit.
    """
    if isinstance(count, int):
        side = math.isqrt(count) + 2
        bits = max(1, side.bit_length())
    else:  # a width known only when the step runs: exponents below 2**32
        side = tf.cast(tf.math.ceil(tf.sqrt(tf.cast(count, tf.float64))), tf.int64) + 1
        bits = 32
    low = _small_powers(point, side, bits)  # point**0 .. point**(side - 1)
    step = tf.math.floormod(low[-1] * point, _PRIME)  # point**side
    high = _small_powers(step, side, bits)  # point**(side * k)
    table = tf.math.floormod(high[:, None] * low[None, :], _PRIME)
    # point**(e) for e = 1 .. count: row e // side, column e % side.
    return tf.reshape(table, [-1])[1 : count + 1]


def _kind(leaf: tf.Tensor) -> str:
    """How `_words` reads a leaf's values (one letter), or a ValueError if it cannot."""
    dtype = leaf.dtype
    if dtype == tf.string:
        return "s"
    if dtype == tf.float64:
        return "d"
    if dtype.is_floating:
        return "f"
    if dtype.is_integer or dtype == tf.bool:
        return "i"
    raise ValueError(f"its dtype {dtype.name} cannot be digested")


def _leaves(structure: Any, path: str = "") -> typing.List[typing.Tuple[str, Any]]:
    """(path, leaf) of every leaf of `structure`, lists and tuples alike, dict keys sorted."""
    if isinstance(structure, collections.abc.Mapping):
        return [
            item
            for key in sorted(structure, key=repr)
            for item in _leaves(structure[key], f"{path}[{key!r}]")
        ]
    if isinstance(structure, (list, tuple)):
        return [
            item for i, value in enumerate(structure) for item in _leaves(value, f"{path}[{i}]")
        ]
    return [(path, structure)]


def _unreadable(structure: Any) -> typing.Optional[typing.Tuple[str, str]]:
    """(path, why) of the first leaf of `structure` the digest cannot read, or None.

    Every leaf must be a dense tensor (or what converts to one) of strings,
    numbers or booleans: a `tf.RaggedTensor` or `tf.SparseTensor` (never
    built by the package's Poisson pipelines) would carry content beside
    the sealed rows.
    """
    for path, leaf in _leaves(structure):
        if isinstance(leaf, tf.__internal__.CompositeTensor):
            return path, f"a {type(leaf).__name__} (only dense tensors are sealed)"
        try:
            _kind(tf.convert_to_tensor(leaf))
        except (TypeError, ValueError) as error:
            return path, str(error)
    return None


def _layout(leaves: typing.List[typing.Tuple[str, tf.Tensor]]) -> int:
    """A 63-bit digest of the element's structure: its leaves' paths, kinds and ranks.

    Hashed with the content, so that an element with an input added,
    removed, renamed or reshaped does not match its seal even when its
    values' words would.
    """
    text = ";".join(f"{path}:{_kind(leaf)}{leaf.shape.rank}" for path, leaf in leaves)
    digest = hashlib.blake2b(text.encode(), digest_size=8, person=b"tan-layout").digest()
    return int.from_bytes(digest, "little") >> 1


# No data-dependent Python control flow: AutoGraph's conversion (in tf.data
# maps and train steps) would only cost tracing time.
@tf.autograph.experimental.do_not_convert
def _digest(structure: Any, identity: tf.Tensor, nonce=0) -> tf.Tensor:
    """[rows] int64: each row's digest of `structure` (features, labels and mask).

    Args:
      structure: The element's content, dense leaves of shape [rows, ...]
        (a scalar leaf is read on every row).
      identity: [rows, len(IDENTITY_COLUMNS)] int64, the rows' identity: its
        step and micro-batch choose the secret evaluation points.
      nonce: The int64 of the pipeline that sealed the element
        (`sampling.pipeline_nonce`; 0 for identities built by hand): two
        pipelines with one key over the same data seal the same rows
        differently, so the model tells the one `fit` pinned from its twin.

    Returns:
      One residue in [0, 2**31 - 1) per row.

    Raises:
      ValueError: for a leaf the digest cannot read (`_unreadable`).
    """
    identity = tf.cast(identity, tf.int64)
    rows = tf.shape(identity)[0]
    bad = _unreadable(structure)
    if bad is not None:
        raise ValueError(f"The training element's leaf {bad[0] or 'x'} cannot be sealed: {bad[1]}.")
    leaves = [(path, tf.convert_to_tensor(leaf)) for path, leaf in _leaves(structure)]
    # The row's own identity (step, micro-batch, count, N, B, source, row,
    # rows) is part of what is hashed: a row copied into another position,
    # or a micro-batch cut short with a new row count, does not match; and
    # so are the element's layout and the sealing pipeline's nonce.
    extra = tf.stack([tf.constant(_layout(leaves), tf.int64), tf.cast(nonce, tf.int64)])
    header = tf.concat([identity[:, :COLUMN], tf.tile(extra[None], [rows, 1])], axis=1)
    parts = [_words(header)]
    for _, leaf in leaves:
        if leaf.shape.rank == 0:
            leaf = tf.fill([rows], leaf)
        parts.append(_words(tf.reshape(leaf, [tf.shape(leaf)[0], -1])))
    # One polynomial over all of a row's words: one table of powers.
    words = tf.concat(parts, axis=1)
    width = words.shape[1]
    if width is None:
        width = tf.shape(words, out_type=tf.int64)[1]
    powers = _powers(_point(identity[0, 0], identity[0, 1]), width)
    return tf.math.floormod(
        tf.reduce_sum(tf.math.floormod(words * powers[None, :], _PRIME), axis=1), _PRIME
    )


@tf.autograph.experimental.do_not_convert
def _seal(content: Any, identity: tf.Tensor, nonce=0) -> tf.Tensor:
    """`identity` with each row's digest of `content` in its last column.

    Args:
      content: `(x, y, mask)` as the element will hold them.
      identity: [rows, len(IDENTITY_COLUMNS)] int64.
      nonce: The sealing pipeline's nonce (`_digest`).

    Returns:
      The identity to put into the element.
    """
    identity = tf.cast(identity, tf.int64)
    column = _digest(content, identity, nonce)[:, None]
    return tf.concat([identity[:, :COLUMN], column, identity[:, COLUMN + 1 :]], axis=1)


@tf.autograph.experimental.do_not_convert
def matches(content: Any, identity: tf.Tensor, nonce=0) -> tf.Tensor:
    """Whether every row's content is the one its identity was sealed with (scalar bool).

    `nonce` is the one of the pipeline `fit` pinned (`_digest`): an element
    sealed by another pipeline, even one with the same stream id, does not match.
    """
    identity = tf.cast(identity, tf.int64)
    return tf.reduce_all(tf.equal(_digest(content, identity, nonce), identity[:, COLUMN]))
