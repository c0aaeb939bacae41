"""`fit(x, y, batch_size=B, epochs=E)` on in-memory data, Poisson-sampled by the model.

Keras cuts arrays into shuffled fixed-size batches, which the Poisson
accounting does not cover. With sampling="poisson" a private model instead
draws the batches itself: the arrays become a `make_poisson_dataset` over a
fresh `PoissonSampler` (its key from OS entropy), read from the step the
privacy ledger releases next, so that each epoch is about N / B noisy
updates of expected size B. Everything the pipeline route checks (the
sampling identity of every micro-batch) holds here too: it is that route.

`batch_size` keeps the meaning it has for Keras's memory: the rows of one
forward and backward pass. Left out or equal to B, a logical step is one
micro-batch of B + 4 std rows (as `PoissonSampler` pads by default). Below
B, it is the physical micro-batch size P: each logical step of expected size
B is cut into micro-batches whose clipped gradients add up to one noisy
update, divided by B (gradient accumulation, as Opacus's
BatchMemoryManager), so a keras.io script that fits with `batch_size=32`
keeps that line while the privacy plan draws larger batches. Every step is
padded to the same number of micro-batches, ceil((B + 4 std) / P)
(`PoissonSampler(pad_steps=True)`): otherwise the Keras batches of a step
(callbacks, the progress bar) would be ceil(n / P) for its realized Poisson
size n, which nothing noises. A step above B + 4 std rows (probability
about 3e-5) spills into one more micro-batch, as the sampler documents.
Above B `batch_size` is refused: no update can hold more than its expected
size promises.

`validation_split` holds out the LAST fraction of the rows, as Keras does,
before any sampling: those rows are never trained on, and N (the model's
`dataset_size`) counts only the rows that are.
"""

import math
from typing import Any, Dict, Optional

import numpy as np
import tensorflow as tf

from tan_keras import _validate
from tan_keras.keras_dp.dp_config import DPConfig
from tan_keras.mechanism import held_out, sampling

# fit() arguments that only mean something for Keras' own batching.
_KERAS_BATCHING = ("batch_size", "shuffle", "validation_split", "y", "sample_weight")


def rows(data: Any) -> int:
    """The number of examples in a structure of arrays (all leaves must agree).

    Raises:
      ValueError: naming `x`, for leaves of different lengths or without a batch axis.
    """
    leaves = tf.nest.flatten(data)
    counts = sorted({int(np.shape(leaf)[0]) if np.ndim(leaf) else -1 for leaf in leaves})
    if not leaves or len(counts) != 1 or counts[0] < 1:
        raise _validate.invalid(
            "x", "arrays with one row per example each (a batch axis first)", counts
        )
    return counts[0]


def split_rows(data: Any, at: int):
    """(`data`[:at], `data`[at:]) for every leaf of a structure of arrays."""
    head = tf.nest.map_structure(lambda leaf: leaf[:at], data)
    tail = tf.nest.map_structure(lambda leaf: leaf[at:], data)
    return head, tail


def poisson_arguments(
    config: DPConfig, arguments: Dict[str, Any], repeated_rows: str = "refuse"
) -> Dict[str, Any]:
    """`fit`'s arguments for in-memory data, rewritten to read a Poisson pipeline.

    Args:
      config: The model's DP configuration (sampling="poisson").
      arguments: `fit`'s bound arguments by name; `x` is in-memory data.
      repeated_rows: "refuse" (training rows holding an example twice are
        refused) or "distinct_people" (`make_poisson_dataset`).

    Returns:
      The arguments with `x` an endless `make_poisson_dataset` of the
      training rows in micro-batches of `batch_size` rows, every logical
      step padded to the same number of them (see the module docstring),
      `steps_per_epoch` the micro-batches of ceil(N / B) logical steps
      unless given, and the held-out rows as `validation_data`.

    Raises:
      ValueError: before any work, for missing labels, a `sample_weight`, a
        `batch_size` above the model's expected batch size, a
        `validation_split` outside [0, 1), leaving no row out or holding
        out a copy of a training row (`held_out.py`), a number
        of training rows other than the model's `dataset_size`, or a
        repeated example.
    """
    x, y = arguments.get("x"), arguments.get("y")
    if y is None:
        raise _validate.invalid(
            "y",
            "the labels of the in-memory training examples",
            None,
            "A private model needs labels: its loss is computed per example",
        )
    if arguments.get("sample_weight") is not None:
        raise _validate.invalid(
            "sample_weight",
            "None for in-memory data with sampling='poisson' (the model draws the batches itself)",
            "an array",
            "Weigh examples inside the loss with constants known without the training data, "
            "or leave an example out of x and y",
        )
    physical_batch_size = physical_rows(config, arguments.get("batch_size"))
    total = rows(x)
    if rows(y) != total:
        raise _validate.invalid("y", f"one label per example ({total} rows, as x)", rows(y))
    split = _validate.real(
        "validation_split",
        arguments.get("validation_split") or 0.0,
        low=0.0,
        high=1.0,
        high_inclusive=False,
    )
    validation = arguments.get("validation_data")
    train_rows = total
    if split > 0 and validation is None:
        # As Keras: the last fraction of the rows, before any sampling.
        train_rows = int(math.floor(total * (1.0 - split)))
        if train_rows in (0, total):
            raise _validate.invalid(
                "validation_split",
                f"a fraction that leaves at least one of the {total} rows on each side",
                split,
            )
        x, x_held = split_rows(x, train_rows)
        y, y_held = split_rows(y, train_rows)
        # A record on both sides: its `val_` metrics would be a training statistic.
        held_out.refuse_split_copies(x, x_held)
        validation = (x_held, y_held)
    if train_rows != config.dataset_size:
        held = f" ({total} rows less validation_split={split})" if train_rows != total else ""
        raise _validate.invalid(
            "dataset_size",
            f"the number of training examples passed to fit: {train_rows}{held}",
            config.dataset_size,
            "N decides the sampling rate q = B / N the accountant uses",
        )
    # pad_steps: every logical step is the same number of micro-batches (one
    # at P = B), else the Keras batches per update (callbacks, progress bar,
    # batches per epoch) would be ceil(n / P) for the realized Poisson size n,
    # a count of the private sample that nothing noises.
    sampler = sampling.PoissonSampler(
        config.dataset_size, config.expected_batch_size, physical_batch_size, pad_steps=True
    )
    steps_per_epoch = arguments.get("steps_per_epoch")
    if steps_per_epoch is None:
        # Whole logical steps, so every epoch has the same layout; a step
        # above B + 4 std rows (probability about 3e-5) spills into one more
        # micro-batch, as the sampler documents, and shifts the layout by it.
        logical_steps = math.ceil(config.dataset_size / config.expected_batch_size)
        steps_per_epoch = logical_steps * sampler.steps_padded_to
    # Endless: Keras keeps one iterator across epochs, so a logical step that
    # spills into a second micro-batch at an epoch's end finishes in the next.
    pipeline = sampling.make_poisson_dataset(
        x, y, sampler, steps=None, augmult=config.augmult, repeated_rows=repeated_rows
    )
    rewritten = {k: v for k, v in arguments.items() if k not in _KERAS_BATCHING}
    rewritten.update(
        x=pipeline,
        steps_per_epoch=_validate.positive_int("steps_per_epoch", steps_per_epoch),
        shuffle=False,
    )
    if validation is not None:
        rewritten["validation_data"] = validation
        if arguments.get("validation_batch_size") is None:
            rewritten["validation_batch_size"] = physical_batch_size or config.expected_batch_size
    return rewritten


def physical_rows(config: DPConfig, batch_size: Any) -> Optional[int]:
    """P for `fit`'s `batch_size`: None (the sampler's default) for None or B, else it.

    Raises:
      ValueError: naming `batch_size`, unless None or an integer in [1, B].
    """
    if batch_size is None or batch_size == config.expected_batch_size:
        return None
    return _validate.integer(
        "batch_size",
        batch_size,
        low=1,
        high=config.expected_batch_size,
        hint=(
            f"fit's batch_size is the rows of one micro-batch, at most the model's "
            f"expected_batch_size ({config.expected_batch_size}): the model draws Poisson "
            "batches of that expected size, accumulates their micro-batches and divides "
            "the noisy sum by it"
        ),
    )
