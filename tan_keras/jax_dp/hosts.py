"""The processes of a private run on the JAX backend: one host, or many under `jax.distributed`.

Every process of a multi-host run (a TPU pod slice, a GPU cluster started
with `keras.distribution.initialize` or `jax.distributed.initialize`) runs
the same `fit`. They must train one model: each draws the same global
Poisson step, loads only its share of the rows, and the noise of a step is
drawn once from one key. So they share one secret, drawn from OS entropy by
process 0 and sent to the others over the run's own collectives (it never
touches a file or a flag); the sampler and the noise keys are derived from
it.
"""

import contextlib
import hashlib
import secrets
from typing import Any, Iterator, Tuple

import jax
import keras
import numpy as np
from keras import tree

SECRET_BITS = 128


def share() -> Tuple[int, int]:
    """(this process's index, the number of processes)."""
    return jax.process_index(), jax.process_count()


def shared_secret() -> int:
    """A 128-bit secret from OS entropy, the same in every process of the run.

    Returns:
      The secret as an int: process 0's draw, received by all others.
    """
    drawn = secrets.randbits(SECRET_BITS)
    if jax.process_count() == 1:
        return drawn
    from jax.experimental import multihost_utils

    words = np.array([(drawn >> (32 * i)) & 0xFFFFFFFF for i in range(4)], dtype=np.uint32)
    received = np.asarray(multihost_utils.broadcast_one_to_all(words)).astype(np.uint64)
    return sum(int(word) << (32 * i) for i, word in enumerate(received))


def check_same_examples(x: Any, y: Any) -> None:
    """Refuses a multi-host fit whose processes were given different training examples.

    Every process loads the drawn examples p, p + P, ... of the global step
    from its own copy of the data, by their global index: the steps are
    Poisson samples of N examples only if every process holds the same N
    (a host given only its own shard, the usual multi-host input habit,
    would train on rows drawn with another probability than q = B / N).
    Arrays are compared by a hash of their bytes, shapes and dtypes; a
    random-access source by its length only (its examples are computed on
    access and may be random views).

    Args:
      x, y: `fit`'s training inputs and labels (y None for a source).

    Raises:
      ValueError: with several processes, when their data differ.
    """
    if jax.process_count() == 1:
        return
    digest = hashlib.blake2b(digest_size=8)
    if y is None:
        digest.update(f"source of {len(x)} examples".encode())
    else:
        for array in tree.flatten((x, y)):
            array = np.ascontiguousarray(array)
            digest.update(f"{array.dtype.str}{array.shape}".encode())
            if array.dtype == object:  # (strings: no buffer to hash)
                digest.update(repr(array.tolist()).encode())
            else:
                # A memoryview of the array's buffer: no copy of the data.
                digest.update(memoryview(array).cast("B"))
    words = np.frombuffer(digest.digest(), dtype=np.uint32)
    from jax.experimental import multihost_utils

    every = np.asarray(multihost_utils.process_allgather(words)).reshape(-1, words.size)
    differing = [i for i, row in enumerate(every) if not np.array_equal(row, every[0])]
    if differing:
        raise ValueError(
            "Invalid value for `x`/`y`: expected the same training examples in every process "
            "of a multi-host fit (each loads its share of every step from its own copy, by the "
            "examples' global indices), but processes "
            f"{differing} hold other data than process 0. Give every process all N examples "
            "(not a shard of its own): the model draws each step's examples and splits them "
            "over the hosts itself."
        )


def check_mesh_spans_every_process(mesh) -> None:
    """Refuses a run of several processes that does not split its rows over all their devices.

    Args:
      mesh: The device mesh of the run's `DataParallel` (None without one).

    Raises:
      ValueError: with several processes, for no distribution, a mesh
        missing some process's devices, or processes with unequal device
        counts (their shares of a step's rows would differ).
    """
    processes = jax.process_count()
    if processes == 1:
        return
    if mesh is None:
        raise ValueError(
            f"DP training in one of {processes} processes needs "
            "keras.distribution.DataParallel() over every process's devices (set it with "
            "keras.distribution.set_distribution before the model is made): without it each "
            "process would train a model of its own on its own Poisson steps."
        )
    in_mesh = {device.id for device in np.ravel(mesh.devices)}
    missing = [device for device in jax.devices() if device.id not in in_mesh]
    if missing:
        raise ValueError(
            f"Invalid distribution: its mesh leaves out {len(missing)} of the "
            f"{len(jax.devices())} devices of the {processes} processes; DP training on several "
            "hosts splits every step's rows over all of them (keras.distribution.DataParallel())."
        )
    per_process = {}
    for device in jax.devices():
        per_process[device.process_index] = per_process.get(device.process_index, 0) + 1
    if len(set(per_process.values())) > 1:
        raise ValueError(
            f"DP training on several hosts needs the same number of devices in every process "
            f"(each feeds an equal share of a step's rows). Received: {per_process}."
        )


@contextlib.contextmanager
def steps_fed_per_process() -> Iterator[None]:
    """Keras takes each process's steps as its share of the global step, as they are.

    Keras would otherwise refuse a generator in a multi-process run (it
    shards only `tf.data` input itself); the Poisson steps are already this
    process's share (`poisson_steps`). The setting is restored afterwards.
    """
    distribution = keras.distribution.distribution()
    if jax.process_count() == 1 or distribution is None:
        yield
        return
    given = distribution.auto_shard_dataset
    distribution.auto_shard_dataset = False
    try:
        yield
    finally:
        distribution.auto_shard_dataset = given
