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
import secrets
from typing import Iterator, Tuple

import jax
import keras
import numpy as np

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
