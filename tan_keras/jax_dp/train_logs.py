"""The statistics a private step on the JAX backend logs (with release_train_metrics).

Computed WITHOUT noise on the drawn examples (not covered by the privacy
guarantee; the model's doc says so): the loss, the compiled metrics,
grad_norm, clipped_fraction and nonfinite_examples. Padding rows and rows
whose gradient was not finite are selected away, and each example weighs 1
in all, whatever its number of views: the training metrics are those
`evaluate` gives on the same examples.
"""

import jax.numpy as jnp
from keras import tree
from keras.src import backend as keras_backend

from tan_keras import _keras_internals
from tan_keras.jax_dp.clipped_sum import ClippedSum
from tan_keras.keras_dp import callback_checks


def training_logs(model, metrics_state, y, outputs, keep, result: ClippedSum):
    """The logs of one private step and the metrics' new state (module doc).

    Args:
      model: The private model (its compiled metrics and loss tracker).
      metrics_state: The metrics' variables' values before the step.
      y: The step's labels, one row per example.
      outputs: The model's outputs per row, [rows, views, ...].
      keep: [rows] True on the drawn rows.
      result: The step's `ClippedSum`.

    Returns:
      (logs, new metrics state).
    """
    # Statistics of the examples that contributed: padding and non-finite
    # rows are selected away (0 * NaN would still poison an average), and
    # each example weighs 1 in all, whatever its number of views.
    views = model.dp_config.augmult
    kept = jnp.logical_and(keep, jnp.logical_not(result.nonfinite))
    real = kept.astype(jnp.float32)
    count = jnp.sum(real)

    def kept_views(prediction):
        rows = kept.reshape((-1,) + (1,) * (prediction.ndim - 1))
        prediction = jnp.where(rows, prediction, jnp.zeros_like(prediction))
        return prediction.reshape((-1,) + prediction.shape[2:])

    labels = tree.map_structure(lambda a: jnp.repeat(a, views, axis=0), y)
    weights = jnp.repeat(real / views, views)
    mapping = list(zip(model.metrics_variables, metrics_state))
    with keras_backend.StatelessScope(state_mapping=mapping) as scope:
        mean_loss = jnp.sum(jnp.where(kept, result.losses, 0.0)) / jnp.maximum(count, 1.0)
        model._loss_tracker.update_state(mean_loss, sample_weight=count)
        # Keras updates `metrics` without sample weights: padding rows
        # would count as examples, so every compiled metric gets them.
        _keras_internals.update_compiled_metrics(
            model, labels, tree.map_structure(kept_views, outputs), weights, weights
        )
        logs = dict(model.get_metrics_result())
    new_state = []
    for ref, value in zip(model.metrics_variables, metrics_state):
        current = scope.get_current_value(ref)
        new_state.append(value if current is None else current)
    clipped = jnp.logical_and(kept, result.norms > model.dp_config.l2_norm_clip)
    logs["grad_norm"] = jnp.sum(jnp.where(kept, result.norms, 0.0)) / jnp.maximum(count, 1.0)
    logs["clipped_fraction"] = jnp.sum(clipped) / jnp.maximum(count, 1.0)
    logs["nonfinite_examples"] = jnp.sum(result.nonfinite)
    # Traced, not run: a `get_metrics_result` of one's own decides its keys.
    callback_checks.check_step_logs(logs)
    return logs, new_state
