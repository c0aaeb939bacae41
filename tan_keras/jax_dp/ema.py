"""The exponential moving average (EMA) of the weights, on the JAX backend.

As on TensorFlow (`keras_dp/ema.py`): the EMA moves with each noisy update,
from the released weights only, so it is post-processing and costs no
privacy; its decay warms up as min(d, (1 + t) / (10 + t)), t the number of
updates the weights went through before this one (their ledger's count, so
a second training phase does not warm up again). The shadows are
non-trainable variables of the model, one per floating-point weight (frozen
ones too, so that a layer unfrozen later has one): they are in the model's
files and in its privacy ledger like the weights they average.
"""

import contextlib
from typing import List, Optional, Sequence, Tuple

import jax.numpy as jnp
import keras
import numpy as np

from tan_keras import _validate


def checked_decay(decay: Optional[float]) -> Optional[float]:
    """`decay` if None or in [0, 1).

    Raises:
      ValueError: naming `ema_decay`, for any other value.
    """
    if decay is None:
        return None
    return _validate.real("ema_decay", decay, low=0.0, high=1.0, high_inclusive=False)


def make_shadows(weights: Sequence, decay: Optional[float]) -> Tuple[List, Optional[List]]:
    """(sources, shadows): each floating-point weight and its EMA variable, a copy of it.

    Args:
      weights: The model's weights.
      decay: The EMA decay; None: no EMA, ([], None).

    Returns:
      The floating-point weights and one new non-trainable variable each,
      holding a copy of its value.
    """
    if decay is None:
        return [], None
    sources = [v for v in weights if np.dtype(v.dtype).kind == "f"]
    shadows = [
        keras.Variable(
            np.array(v.value),
            trainable=False,
            name="ema_" + v.path.replace("/", "_"),
        )
        for v in sources
    ]
    return sources, shadows


def shadows_of(sources: Sequence, shadows: Sequence, variables: Sequence) -> List:
    """The shadow of each of `variables` (each one of `sources`)."""
    shadow = {id(source): s for source, s in zip(sources, shadows)}
    return [shadow[id(v)] for v in variables]


def shadow_indices(model, trainable_shadows: Sequence) -> List[int]:
    """Where each trainable variable's shadow is in `model.non_trainable_variables`."""
    position = {id(v): i for i, v in enumerate(model.non_trainable_variables)}
    return [position[id(shadow)] for shadow in trainable_shadows]


def warmed_decay(decay: float, step) -> jnp.ndarray:
    """The warmed-up decay min(d, (1 + t) / (10 + t)) at step t."""
    t = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + t) / (10.0 + t))


def updated(non_trainable: list, indices: Sequence[int], trainable: Sequence, decay, step) -> list:
    """`non_trainable` with each trainable variable's shadow moved towards its new value.

    Args:
      non_trainable: The non-trainable values (the shadows among them).
      indices: `shadow_indices`: where each trainable variable's shadow is.
      trainable: The trainable values after the update.
      decay: The EMA decay d.
      step: t, the updates the weights went through before this one.

    Returns:
      A new list of non-trainable values.
    """
    rate = warmed_decay(decay, step)
    values = list(non_trainable)
    for i, value in zip(indices, trainable):
        shadow = values[i]
        values[i] = (rate * shadow + (1.0 - rate) * value.astype(shadow.dtype)).astype(shadow.dtype)
    return values


@contextlib.contextmanager
def swapped_in(variables: Sequence, shadows: Sequence):
    """Context manager: `variables` hold the `shadows`' values inside the block.

    The variables get their own values back on exit, also on an exception.
    """
    backup = [np.array(v.value) for v in variables]
    for v, shadow in zip(variables, shadows):
        # A copy: a variable holding the shadow's own buffer would be passed
        # twice to Keras's steps, which donate their state's buffers (XLA
        # refuses to donate one buffer twice: evaluate failed).
        v.assign(np.array(shadow.value))
    try:
        yield
    finally:
        for v, saved in zip(variables, backup):
            v.assign(saved)
