"""The privately released clipped fraction on the JAX backend (Andrew et al. 2021).

With `clipped_fraction_std` s, once per logical step: the number of the
step's examples whose gradient norm exceeded C (each example moves it by at
most 1), plus Gaussian noise of std s * B, divided by B; logged as
`noisy_clipped_fraction`, the mean over the epoch's steps. The noise comes
from the step's own key, on a stream apart from the gradient's, and is
added once, outside the per-device work. The count is accounted with the
update (`DPConfig.accounted_noise_multiplier`), and it is released also
with `release_train_metrics=False`, as on TensorFlow.
"""

import jax
import jax.numpy as jnp
import keras
from keras.src import backend as keras_backend

from tan_keras.jax_dp.clipped_sum import ClippedSum

# The name of the logged value; the stream of the count's noise (the
# gradient's leaves take the keys `jax.random.split` makes).
NAME = "noisy_clipped_fraction"
_COUNT_STREAM = 2**31 - 1


def tracker() -> keras.metrics.Mean:
    """The metric that averages the released fractions over an epoch."""
    return keras.metrics.Mean(name=NAME)


def noisy_count(count, key_data: jax.Array, stddev: float) -> jax.Array:
    """`count` plus N(0, stddev^2) from the count's stream of the step's key."""
    key = jax.random.wrap_key_data(key_data.astype(jnp.uint32), impl="threefry2x32")
    key = jax.random.fold_in(key, _COUNT_STREAM)
    return count + stddev * jax.random.normal(key, (), jnp.float32)


def release(model, metrics_state, result: ClippedSum, keep, key_data):
    """The step's released fraction into the model's tracker: (logs, new metrics state).

    Args:
      model: The private model (its `dp_config` and its tracker).
      metrics_state: The metrics' variables' values before (after the
        training statistics, if any).
      result: The step's `ClippedSum` (its norms).
      keep: [rows] True on the drawn rows.
      key_data: The step's noise key.

    Returns:
      ({NAME: the epoch's mean so far}, the metrics' new state).
    """
    config = model.dp_config
    counted = jnp.logical_and(keep, jnp.logical_not(result.nonfinite))
    count = jnp.sum(jnp.logical_and(counted, result.norms > config.l2_norm_clip))
    fraction = (
        noisy_count(count.astype(jnp.float32), key_data, config.clipped_count_noise_std)
        / config.expected_batch_size
    )
    mapping = list(zip(model.metrics_variables, metrics_state))
    with keras_backend.StatelessScope(state_mapping=mapping) as scope:
        model.noisy_clipped_tracker.update_state(fraction)
        value = model.noisy_clipped_tracker.result()
    new_state = []
    for ref, old in zip(model.metrics_variables, metrics_state):
        current = scope.get_current_value(ref)
        new_state.append(old if current is None else current)
    return {NAME: value}, new_state
