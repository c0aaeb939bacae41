"""What `DPKerasModel.fit` accepts as training input, and what it refuses.

The accountant's epsilon is only valid for the sampling that actually
happened, so the input decides it, not a warning:

* `sampling="poisson"` (default): batches must come from a Poisson pipeline
  (`tan_keras.make_poisson_dataset`, elements
  `(x, y, mask, step_end, identity)`). Every row carries its micro-batch's
  identity (step, index in the step, N, B, sampler stream), which the train
  step checks against the privacy ledger (`step_identity.py`), whatever
  feeds `fit` (a dataset, a distributed dataset, a generator, a
  `PyDataset`), and every micro-batch of a fit must come from the one
  stream `fit` pinned before its first step (`stream_to_pin`): a generator
  cannot pick among pipelines. In-memory arrays, `fit(x, y, batch_size=B)`,
  are turned into such a pipeline by the model (`array_inputs.py`). Plain `(x, y)`
  batches -- a shuffled and batched dataset, a generator of batches -- and
  micro-batches without identity are refused: nothing says they are Poisson
  samples, each used once.
* `sampling="caller_poisson"`: the opt-in for callers who draw Poisson
  micro-batches themselves, `(x, y, mask, step_end)`, and vouch for them.
* `sampling="shuffled"`: `fit(x, y, batch_size=B)` on in-memory arrays,
  which Keras cuts into a partition of the N examples at every epoch. Each
  epoch is accounted as one unamplified Gaussian mechanism (see
  `tan_keras.privacy.accounting.shuffled_dp_event`); the model counts the
  epochs in which it released an update.
"""

import types
import weakref
from typing import Any, Dict, Optional, Tuple

import keras
import numpy as np
import tensorflow as tf

from tan_keras import _validate

# (In a module without TensorFlow, for the JAX backend; still read from here.)
from tan_keras.keras_dp.callback_checks import (  # noqa: F401
    PRIVATE_TRAINING_LOGS,
    check_callbacks,
    check_fit,
    check_weight_file,
)
from tan_keras.keras_dp.dp_config import DPConfig
from tan_keras.mechanism import sampling

POISSON = "poisson"
MICRO_BATCHES = "micro_batches"
PLAIN = "plain"

NOT_POISSON_ERROR = (
    "DPKerasModel received plain (x, y) batches, but its epsilon is accounted for "
    "Poisson sampling (sampling='poisson'): each example included independently with "
    "probability q = B/N at every step. Shuffled fixed-size batches do not satisfy it "
    "and the reported epsilon would not be a valid bound (audits measured 4-10x gaps). "
    "Pass the in-memory arrays themselves, fit(x, y, batch_size=expected_batch_size, "
    "epochs=...), and the model draws Poisson batches from them; for a tf.data pipeline "
    "feed tan_keras.make_poisson_dataset(...) instead."
)

NO_IDENTITY_ERROR = (
    "DPKerasModel received micro-batches (x, y, mask, step_end) without a sampling "
    "identity, but with sampling='poisson' every micro-batch must carry the identity its "
    "sampler gave it, so that no step can be replayed, reordered, regrouped or skipped "
    "unnoticed. Feed tan_keras.make_poisson_dataset(...), or, if you draw Poisson "
    "micro-batches yourself and vouch for them, build the model with "
    "sampling='caller_poisson' (the accountant then says the sampling was not checked)."
)


def element_kind(data: Any) -> str:
    """Which protocol one training element follows.

    Args:
      data: A training element (or its structure spec).

    Returns:
      POISSON for `(x, y, mask, step_end, tag)`, MICRO_BATCHES for
      `(x, y, mask, step_end)`, PLAIN for anything else (`(x, y)`,
      `(x, y, sample_weight)`, `x`).
    """
    if isinstance(data, (tuple, list)):
        if len(data) == 5:
            return POISSON
        if len(data) == 4:
            return MICRO_BATCHES
    return PLAIN


def check_element(config: DPConfig, data: Any) -> str:
    """Refuses an element whose sampling the model cannot account for.

    Args:
      config: The model's DP configuration.
      data: A training element.

    Returns:
      Its `element_kind`.

    Raises:
      ValueError: plain batches under Poisson sampling, micro-batches
        without identity under sampling="poisson", or Poisson micro-batches
        under sampling="shuffled".
    """
    kind = element_kind(data)
    if config.poisson and kind == PLAIN:
        raise ValueError(NOT_POISSON_ERROR)
    if config.sampling == "poisson" and kind == MICRO_BATCHES:
        raise ValueError(NO_IDENTITY_ERROR)
    if config.sampling == "shuffled" and kind != PLAIN:
        raise ValueError(
            "Invalid value for `sampling`: expected 'poisson' for batches of a Poisson "
            "pipeline (x, y, mask, step_end[, identity]). Received: sampling='shuffled'"
        )
    return kind


def prepare(config: DPConfig, arguments: Dict[str, Any]) -> Dict[str, Any]:
    """Checks `fit`'s arguments before any work; returns them, `x` maybe wrapped.

    Args:
      config: The model's DP configuration.
      arguments: `fit`'s bound arguments by name.

    Returns:
      The arguments to pass on: a Poisson dataset's elements get their
      sampling tag checked against (N, B) as they are read.

    Raises:
      ValueError: for input whose sampling the model cannot account for.
    """
    data = arguments.get("x")
    if isinstance(data, tf.data.Dataset):
        check_element(config, data.element_spec)
        if config.sampling == "shuffled":
            return _check_shuffled_arrays(config, arguments)  # refuses the dataset
        if element_kind(data.element_spec) == POISSON:
            wrapped = sampling.check_sampling_tags(
                data, config.dataset_size, config.expected_batch_size
            )
            return {**arguments, "x": wrapped}
        return arguments
    if isinstance(data, tf.distribute.DistributedDataset):
        if config.sampling == "shuffled":
            return _check_shuffled_arrays(config, arguments)  # refuses it
        drawn_for = sampling.distributed_sampling(data)
        accounted = (config.dataset_size, config.expected_batch_size)
        if drawn_for is None:
            raise ValueError(
                "Invalid value for `x`: a distributed dataset not made by "
                "tan_keras.mechanism.sampling.distribute_poisson_dataset, so its sampling "
                "cannot be checked. Pass the Poisson dataset itself (Keras distributes it) "
                "or build per-host input with distribute_poisson_dataset."
            )
        if tuple(drawn_for) != accounted:
            raise ValueError(
                "Invalid value for `x`: its Poisson samplers draw for (dataset_size, "
                f"expected_batch_size)={tuple(drawn_for)} but the model accounts for "
                f"{accounted}. Build the PoissonSampler with the model's values."
            )
        return arguments
    if config.poisson:
        if is_array(data):
            raise _validate.invalid(
                "sampling",
                "'poisson' to train on in-memory arrays (the model then draws the Poisson "
                "batches itself)",
                config.sampling,
                "With sampling='caller_poisson' fit takes only the caller's micro-batches "
                "(x, y, mask, step_end)",
            )
        if config.sampling == "poisson":
            # Before the generator is first read: it must not be able to
            # choose among pipelines, not even at its first step.
            stream_to_pin(config, data)
            if isinstance(data, types.GeneratorType):
                return {**arguments, "x": _detachable(data)}
        return arguments  # generators...: their elements are checked in train_step
    return _check_shuffled_arrays(config, arguments)


# Generators fit reads through (`_detachable`) -> the list holding the caller's.
_HOLDERS = weakref.WeakKeyDictionary()


def _detachable(generator: types.GeneratorType) -> types.GeneratorType:
    """A generator relaying `generator`'s elements until `detach` lets go of it.

    TensorFlow keeps what Keras reads a generator through (its
    `from_generator` functions) for the life of the process: a pipeline the
    caller's generator holds would stay alive, and count in every later
    fit's `sampling.live_pipelines`.
    """
    holder = [generator]

    def relay():
        while holder:
            try:
                element = next(holder[0])
            except StopIteration:
                return
            yield element

    wrapper = relay()
    _HOLDERS[wrapper] = holder
    return wrapper


def detach(data: Any) -> None:
    """Lets go of the caller's generator behind `data` (from `prepare`), if any."""
    try:
        holder = _HOLDERS.pop(data, None)
    except TypeError:  # not weak-referenceable: not a generator of ours
        return
    if holder is not None:
        holder.clear()


def stream_to_pin(config: DPConfig, data: Any) -> Optional[int]:
    """The Poisson stream a fit on `data` must read from, pinned before its first step.

    A generator or `PyDataset` re-yielding whole steps of several pipelines
    (other keys, or one key over other data) could take each step from the
    pipeline whose step suits it (one that holds a target example: measured
    0.70 inclusion per step for q = 0.25), every element intact. So the
    stream is fixed before the data can choose it:

    * a `tf.data` input with pipelines of `make_poisson_dataset` upstream
      (what the model builds from arrays included): the first one's stream;
    * a Python generator: the only registered pipeline alive for the
      model's (N, B) (`sampling.live_pipelines`; a generator's iterator
      holds its pipeline), looked up before Keras reads it and again when
      training begins (after Keras has read its first elements: a
      generator may build its pipeline then); refused while several are;
    * any other input code fit cannot see through (a `tf.data` input from
      `from_generator`, a distributed dataset of your own): the most
      recently built pipeline alive, chosen before that code has read
      anything in this fit (Keras does not read a dataset ahead), since
      TensorFlow keeps alive for good what an earlier `from_generator`
      held;
    * none when no pipeline is alive: then every micro-batch of a pipeline
      is refused at the first step (`step_identity.NOT_PINNED`).

    Args:
      config: The model's DP configuration.
      data: `fit`'s `x`, as `fit` passes it on.

    Returns:
      The stream id to pin, or None to pin none.

    Raises:
      ValueError: naming `x`, for a generator or `PyDataset` while several
        pipelines for the model's (N, B) are alive: it could pick among them.
    """
    pipelines = sampling.poisson_pipelines(data)
    if pipelines:
        return sampling.stream_of(pipelines[0])
    live = sampling.live_pipelines(config.dataset_size, config.expected_batch_size)
    if not live:
        return None
    python_level = not isinstance(data, (tf.data.Dataset, tf.distribute.DistributedDataset))
    if len(live) > 1 and python_level:
        raise _validate.invalid(
            "x",
            "the Poisson pipeline itself (fit pins its stream), or a generator or PyDataset "
            "while exactly one pipeline for the model's (dataset_size, expected_batch_size)="
            f"({config.dataset_size}, {config.expected_batch_size}) is alive",
            f"a {type(data).__name__} while {len(live)} such pipelines are alive",
            "fit cannot see which pipeline a generator reads, and one that takes each step "
            "from one of several pipelines (other keys, or one key over other data) picks "
            "from their data which examples a step holds: an example would be in more steps "
            "than q = B/N, which epsilon does not cover. Pass the make_poisson_dataset "
            "pipeline to fit, or drop the other pipelines (del them) before fitting",
        )
    return sampling.stream_of(live[-1])


def pin_of(config: DPConfig, data: Any) -> Optional[Tuple[int, int]]:
    """(stream id, pipeline nonce) a fit on `data` is pinned to, or None (`stream_to_pin`).

    The stream id names the key and the data only, so twins (two pipelines
    with one key over the same data: other augmenters) share it; the
    pipeline's nonce, bound into every seal (`sampling.pipeline_nonce`),
    tells them apart: the model checks every element's seal with the pinned
    pipeline's nonce. It is the nonce of the pipeline `stream_to_pin` chose:
    the first upstream of `data`, else the most recently built one alive
    for the model's (N, B) with that stream.

    Raises:
      ValueError: as `stream_to_pin`.
    """
    stream = stream_to_pin(config, data)
    if stream is None:
        return None
    candidates = sampling.poisson_pipelines(data)
    if not candidates:
        # The pipelines alive for the model's (N, B), most recent first:
        # `stream_to_pin` chose the first (it collected the garbage just
        # now, `live_pipelines`). Only those are read: a pipeline other
        # tests or phases left alive for another (N, B) is no candidate,
        # and its stream is not looked up.
        candidates = [
            pipeline
            for pipeline in reversed(sampling.live_pipelines_uncollected())
            if _draws_for(pipeline, config)
        ]
    for pipeline in candidates:
        if sampling.stream_of(pipeline) == stream:
            return stream, sampling.nonce_of(pipeline)
    return stream, 0


def _draws_for(pipeline: Any, config: DPConfig) -> bool:
    """Whether a registered pipeline's sampler draws for the model's (N, B)."""
    sampler = sampling.sampler_of(pipeline)
    return sampler is not None and (sampler.dataset_size, sampler.expected_batch_size) == (
        config.dataset_size,
        config.expected_batch_size,
    )


def runs_code_between_updates(data: Any) -> bool:
    """Whether reading `data` runs the caller's Python code during the fit.

    A generator, a `PyDataset` or another Python iterator is read between
    updates, so its code can copy the weights as they are mid-fit (the
    model then remembers every update's values, `dp_state.AfterUpdate`).
    """
    if data is None or is_array(data) or isinstance(data, (tf.data.Dataset, str, bytes)):
        return False
    if isinstance(data, (types.GeneratorType, keras.utils.PyDataset)):
        return True
    return hasattr(data, "__next__") or (
        hasattr(data, "__iter__") and not isinstance(data, tf.distribute.DistributedDataset)
    )


def is_array(data: Any) -> bool:
    """Whether `data` is in-memory arrays (Keras batches and shuffles those itself)."""
    return isinstance(data, (np.ndarray, tf.Tensor, list, dict)) or hasattr(data, "__array__")


def _check_shuffled_arrays(config: DPConfig, arguments: Dict[str, Any]) -> Dict[str, Any]:
    data = arguments.get("x")
    leaves = tf.nest.flatten(data) if isinstance(data, (list, tuple, dict)) else [data]
    if not leaves or not all(
        is_array(leaf) and not isinstance(leaf, (list, dict)) and np.ndim(leaf) >= 1
        for leaf in leaves
    ):
        raise _validate.invalid(
            "x",
            "in-memory arrays (one, or a list or dict of them) with sampling='shuffled' "
            "(Keras then cuts each epoch into "
            "a partition of the examples, which the accounting relies on)",
            type(data).__name__,
            "For a tf.data pipeline use sampling='poisson' and make_poisson_dataset",
        )
    counts = sorted({int(np.shape(leaf)[0]) for leaf in leaves})
    if len(counts) != 1:
        raise _validate.invalid("x", "arrays with one row per example each", counts)
    rows = counts[0]
    if rows != config.dataset_size:
        raise _validate.invalid(
            "dataset_size",
            f"the number of training examples passed to fit ({rows})",
            config.dataset_size,
        )
    batch_size = arguments.get("batch_size")
    if batch_size != config.expected_batch_size:
        raise _validate.invalid(
            "batch_size",
            f"the model's expected_batch_size ({config.expected_batch_size}): the noisy "
            "sum is divided by it",
            batch_size,
        )
    for name, neutral in (("steps_per_epoch", None), ("validation_split", 0.0)):
        value = arguments.get(name, neutral)
        if value not in (neutral, 0):
            raise _validate.invalid(
                name,
                f"{neutral} with sampling='shuffled' (each epoch must be one pass over "
                "the dataset_size examples)",
                value,
            )
    return arguments
