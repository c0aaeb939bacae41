"""Every Poisson micro-batch is checked against the privacy ledger before it can count.

The accountant's epsilon holds only if each logical step is a fresh Poisson
sample used exactly once, whole: a replayed step (`.cache()` read again, a
restarted generator) puts the same examples into a second update accounted
as an independent one; a reordered, regrouped or partial step is no Poisson
sample at all. A tag saying which sampler drew an element cannot tell; the
identity each row carries can (`sampling.IDENTITY_COLUMNS`: logical step,
index within the step, number of micro-batches of the step, N, B, the
sampler's public stream id, the row's position among the micro-batch's
rows and their number, and a digest of the row's content,
`content_digest.py`).

The compiled train step compares it with the ledger (`check`): the step
must be the next one the ledger will release (`dp_steps`), the micro-batch
the next one of that step, every row the same micro-batch and all its rows
there in order (each replica its share), the step's end where its
identity says, one sampler per step, (N, B) the model's, every row's
content the one its identity was sealed with (a generator or `PyDataset`
that blends the rows it re-yields changes it), and the stream the one
`fit` pinned before the first step (`stream_allowed`): a stream id names
the sampler's key and the data it samples (`PoissonSampler.stream_id`),
and `fit` pins the one pipeline it reads (`fit_inputs.stream_to_pin`), so
that a generator cannot pick, step after step, among several pipelines
the one whose step suits it (a07: the step holding a target example;
a11: one key over `x` and `-x`). The
first mismatch is recorded in a variable (not an assertion: XLA drops
those) and blocks every update until the next `fit`; `DPKerasModel` then
raises `SamplingIdentityError` naming what happened (`describe`). Once the
step cap is reached nothing is released, so nothing is checked.
"""

from typing import Sequence

import tensorflow as tf

from tan_keras.mechanism import content_digest, sampling

OK = 0
REPLAYED = 1
SKIPPED = 2
OUT_OF_ORDER = 3
WRONG_END = 4
MIXED_ROWS = 5
OTHER_SAMPLING = 6
TWO_SOURCES = 7
PARTIAL = 8
CONTENT_CHANGED = 9
NOT_PINNED = 10

# Columns of the identity (sampling.IDENTITY_COLUMNS).
_ROW, _ROWS = 6, 7
_SAME_ON_EVERY_ROW = [0, 1, 2, 3, 4, 5, 7]

# A violation as recorded: code, then the micro-batch's step and index, then
# the step and index the ledger expected.
RECORD_SIZE = 5


class SamplingIdentityError(ValueError):
    """A micro-batch that the privacy ledger cannot account for reached the train step."""


def check(
    identity: tf.Tensor,
    step_end: tf.Tensor,
    expected_step: tf.Tensor,
    expected_micro: tf.Tensor,
    step_source: tf.Tensor,
    dataset_size: int,
    expected_batch_size: int,
    replica_id=0,
    num_replicas: int = 1,
    content_ok=True,
    pinned=0,
    pinned_source=0,
) -> tf.Tensor:
    """The violation code of one replica's share of a micro-batch (OK = 0 when it may count).

    Args:
      identity: [rows, 9] int64, the identity of each row.
      step_end: Scalar bool, whether the element says it ends its step.
      expected_step: The step the ledger releases next (`dp_steps`).
      expected_micro: Micro-batches of that step already accumulated.
      step_source: The stream id of the step's first micro-batch (read only
        when `expected_micro` > 0).
      dataset_size: N the model accounts for.
      expected_batch_size: B the model accounts for.
      replica_id: This replica's index; it holds the rows [replica_id * rows,
        (replica_id + 1) * rows) of the micro-batch.
      num_replicas: The number of replicas sharing each micro-batch.
      content_ok: Scalar bool, whether every row's content matches the
        digest in its identity (`content_digest.matches`).
      pinned: Scalar, nonzero when `fit` pinned a stream for this fit.
      pinned_source: The pinned stream id (read only when `pinned`).

    Returns:
      A scalar int64 code: the first failing property of mixed or partial
      rows (the other fields are then meaningless), another sampling, a
      replayed, skipped or out-of-order micro-batch, two streams in a step,
      a stream not pinned, a changed content (the seal), a wrong step end.
    """
    identity = tf.cast(identity, tf.int64)
    tag = identity[0]
    step, micro, micro_batches, n, b, source, first_row, rows, _ = tf.unstack(tag)
    expected_step = tf.cast(expected_step, tf.int64)
    expected_micro = tf.cast(expected_micro, tf.int64)
    shared = tf.gather(identity, _SAME_ON_EVERY_ROW, axis=1)
    rows_agree = tf.reduce_all(tf.equal(shared, shared[:1]))
    # This replica's rows: its share of the micro-batch, whole and in order.
    local = tf.shape(identity, out_type=tf.int64)[0]
    positions = identity[:, _ROW]
    expected_positions = tf.cast(replica_id, tf.int64) * local + tf.range(local, dtype=tf.int64)
    whole = tf.logical_and(
        tf.equal(local * num_replicas, rows), tf.reduce_all(tf.equal(positions, expected_positions))
    )
    sampling_ok = tf.logical_and(tf.equal(n, dataset_size), tf.equal(b, expected_batch_size))
    ends_here = tf.equal(micro, micro_batches - 1)
    end_ok = tf.logical_and(tf.equal(ends_here, tf.cast(step_end, tf.bool)), micro < micro_batches)
    source_ok = tf.logical_or(tf.equal(expected_micro, 0), tf.equal(source, step_source))
    # Checked in this order; the first that fails names the violation. The
    # seal comes after what the identity itself says (another (N, B), a
    # replayed, skipped or reordered step, another stream): it is checked
    # with the pinned pipeline's nonce, so every element of another pipeline
    # fails it too (another sampling rate, phase 1's steps fed to phase 2),
    # and the identity names what is wrong with those more precisely. An
    # element whose identity is right but whose content is not (rewritten,
    # or sealed by a twin pipeline, or its identity edited to pass: the
    # identity is part of the seal) is refused for its content.
    failures = [
        (tf.logical_not(rows_agree), MIXED_ROWS),
        (tf.logical_not(whole), PARTIAL),
        (tf.logical_not(sampling_ok), OTHER_SAMPLING),
        (step < expected_step, REPLAYED),
        (step > expected_step, SKIPPED),
        (tf.not_equal(micro, expected_micro), OUT_OF_ORDER),
        (tf.logical_not(source_ok), TWO_SOURCES),
        (tf.logical_not(stream_allowed(source, pinned, pinned_source)), NOT_PINNED),
        (tf.logical_not(tf.cast(content_ok, tf.bool)), CONTENT_CHANGED),
        (tf.logical_not(end_ok), WRONG_END),
    ]
    del first_row  # checked with the other positions
    code = tf.constant(OK, tf.int64)
    for failed, value in reversed(failures):
        code = tf.where(failed, tf.constant(value, tf.int64), code)
    return code


def refuse_unsealable(content) -> None:
    """Refuses, when the train step is traced, an element whose content no seal covers.

    The package's Poisson pipelines seal dense tensors only; a leaf the
    digest cannot read (a `tf.RaggedTensor` or `tf.SparseTensor` input
    added by a generator that re-yields the pipeline's elements, a
    dtype without a digest) would reach the model beside the sealed rows:
    a micro-batch statistic in it moves every example's gradient.

    Args:
      content: `(x, y, mask)` of a Poisson element, as it arrived.

    Raises:
      SamplingIdentityError: naming the leaf (x, y or the mask, and its
        path), before any update.
    """
    bad = content_digest._unreadable(content)
    if bad is None:
        return
    path, why = bad
    names = {"[0]": "x", "[1]": "y", "[2]": "the mask"}
    name = names.get(path[:3], "x") + path[3:]
    raise SamplingIdentityError(
        f"Invalid value for `x`: the training element's {name} is {why}. A Poisson "
        "element's seal (content_digest.py) covers its dense features, labels and mask; "
        "an input added beside them (a ragged or sparse tensor a generator or PyDataset "
        "yields with the pipeline's elements) would reach the model unchecked, and a "
        "statistic of the micro-batch in it would move every example's gradient. Feed "
        "the pipeline's elements unchanged; give make_poisson_dataset every input the "
        "model reads, as dense arrays. No update was made."
    )


def stream_allowed(source: tf.Tensor, pinned, pinned_source) -> tf.Tensor:
    """Whether a micro-batch's stream may reach an update in this fit (scalar bool).

    A stream a `PoissonSampler` drew (`sampling.is_pipeline_stream`) must be
    the one `fit` pinned; with none pinned (no pipeline `fit` could find)
    no such stream may. Identities built by hand with the package-internal
    seal (tests) carry no mark and are only held to one stream per step.

    Args:
      source: The micro-batch's stream id.
      pinned: Nonzero when a stream is pinned.
      pinned_source: The pinned stream id.
    """
    source = tf.cast(source, tf.int64)
    is_pinned = tf.logical_and(
        tf.not_equal(tf.cast(pinned, tf.int64), 0),
        tf.equal(source, tf.cast(pinned_source, tf.int64)),
    )
    return tf.logical_or(tf.logical_not(sampling.is_pipeline_stream(source)), is_pinned)


def describe(record: Sequence[int], dataset_size: int, expected_batch_size: int) -> str:
    """The error message for a recorded violation (see `RECORD_SIZE`)."""
    code, step, micro, expected_step, expected_micro = (int(v) for v in record)
    resume = (
        "Read the pipeline from the step the model releases next: a pipeline from "
        "tan_keras.make_poisson_dataset is resumed there by fit() itself; for a sampler fit() "
        f"cannot see, call sampler.resume_at(model.sampling_position) ({expected_step}) first."
    )
    transform = (
        "Apply per-example transformations inside make_poisson_dataset (`augmenter=`) or "
        "with dataset.map on whole elements, and nothing that caches, skips, shuffles, "
        "filters, repeats or regroups its elements."
    )
    where = f"micro-batch {micro} of logical step {step}"
    expected = f"micro-batch {expected_micro} of step {expected_step}"
    messages = {
        REPLAYED: (
            f"The training input replayed a Poisson step: {where} arrived, but the privacy "
            f"ledger has already released updates for steps 0..{expected_step - 1}. A "
            "cached or re-read pipeline (`.cache()`, a restarted generator) would put the "
            "same examples into a second update that the accountant counts as a fresh "
            f"Poisson sample, under-reporting epsilon. {resume}"
        ),
        SKIPPED: (
            f"The training input skipped Poisson steps: {where} arrived where {expected} was "
            "next. Skipped steps (`skip`, `shard`, `filter`, a pipeline read ahead of the "
            f"ledger) break the sampling the accountant assumes. {resume}"
        ),
        OUT_OF_ORDER: (
            f"The training input reordered or dropped micro-batches: {where} arrived where "
            f"{expected} was next. A logical step must arrive whole and in order; "
            f"{transform}"
        ),
        WRONG_END: (
            f"The step_end flag of {where} disagrees with its identity (the number of "
            f"micro-batches of its step). {transform}"
        ),
        MIXED_ROWS: (
            "The rows of one training element belong to different micro-batches: the "
            "pipeline regrouped rows (`unbatch`, `batch`, `rebatch`, zipping pipelines), "
            f"which can put one example twice into a step. {transform}"
        ),
        PARTIAL: (
            f"The rows of {where} arrived incomplete or out of order: the pipeline cut, "
            "filtered or permuted rows (`unbatch`, `filter`, `rebatch`), so what reaches "
            "the update is no Poisson sample (which rows survive depends on which others "
            f"were sampled). {transform}"
        ),
        OTHER_SAMPLING: (
            "A micro-batch drawn for another (dataset_size, expected_batch_size) than the "
            f"model accounts for ({dataset_size}, {expected_batch_size}) reached the train "
            "step: the accountant would report the epsilon of the wrong sampling rate. "
            "Build the PoissonSampler with the model's dataset_size and expected_batch_size."
        ),
        CONTENT_CHANGED: (
            f"The content of {where} is not the one the pipeline this fit pinned built in "
            "this process: a function between the Poisson pipeline and the model (a "
            "generator or PyDataset that re-yields its elements, a MixUp or CutMix of its "
            "rows, a batch statistic, an input added, removed or reshaped) rewrote its "
            "features, labels or mask, so one example's data could reach other examples' "
            "clipped gradients or drop out of the sample; or the element was built by "
            "another pipeline (a twin with the same key over the same data, e.g. another "
            "augmenter: one example's presence could pick which twin a step comes from) "
            "or elsewhere (another process, a saved pipeline). Feed the elements of the "
            "one pipeline fit pinned (passed as x, or the most recently built one alive) "
            "unchanged, built in this process; augment inside "
            "make_poisson_dataset (`augmenter=`) or in the model, one example at a time. "
            "Micro-batches you draw yourself need sampling='caller_poisson' (unchecked, "
            "and named so in the logs)."
        ),
        TWO_SOURCES: (
            f"The micro-batches of logical step {step} come from two different samplers "
            "(interleaved or concatenated pipelines): together they are no Poisson sample, "
            "and one example may be in the step twice. Feed one pipeline at a time."
        ),
        NOT_PINNED: (
            f"{where[0].upper() + where[1:]} comes from another Poisson stream than the one "
            "this fit reads: before the first step fit pinned the stream of the one pipeline "
            "it found (passed as x, or the only one alive for the model's dataset_size and "
            "expected_batch_size), or none when no pipeline was alive, and a stream id names "
            "the sampler's key and the data it samples. A generator or PyDataset that takes "
            "each step from one of several pipelines (other keys, or one key over other "
            "data) picks which examples a step holds from their data: a target example is "
            "then in more steps than q = B/N says, which epsilon does not cover. Pass the "
            "pipeline itself to fit (fit pins it), or re-yield the elements of one pipeline, "
            "kept alive while fit runs."
        ),
    }
    message = messages.get(code, f"Unknown sampling identity violation {code}.")
    return f"{message} No update was made from this micro-batch or any later one."
