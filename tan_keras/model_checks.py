"""Refuses models whose layers would leak information across examples.

DP-SGD bounds each example's influence through its clipped gradient only.
Layers that mix examples (BatchNormalization normalizes with batch statistics)
or keep state updated from data (moving means, activity regularizers feeding
data-dependent losses) leak outside that bound, so they are refused with an
error that says why and what to use instead.
"""

import tensorflow as tf

_BATCH_NORM_HINT = (
    "BatchNormalization mixes the examples of a batch (each output depends on the "
    "batch mean and variance) and updates moving statistics from the data; neither "
    "is covered by per-example clipping, so the DP guarantee would not hold. Use "
    "tf.keras.layers.GroupNormalization (e.g. groups=16) or LayerNormalization, or "
    "weight-standardized convolutions as in tan_keras.models.nf_resnet50."
)


def _batch_norm_classes():
    classes = [tf.keras.layers.BatchNormalization]
    sync = getattr(tf.keras.layers.experimental, "SyncBatchNormalization", None)
    if sync is not None:
        classes.append(sync)
    return tuple(classes)


def check_model_is_dp_compatible(model: tf.keras.Model) -> None:
    """Raises if `model` contains a layer that breaks per-example privacy.

    Args:
      model: The Keras model to be trained with DP-SGD.

    Raises:
      ValueError: naming the first offending layer, saying why it breaks the
        guarantee and what to use instead.
    """
    batch_norms = _batch_norm_classes()
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, batch_norms):
            raise ValueError(
                f"Layer `{layer.name}` ({type(layer).__name__}) cannot be trained "
                f"with DP-SGD. {_BATCH_NORM_HINT}"
            )
        if getattr(layer, "activity_regularizer", None) is not None:
            raise ValueError(
                f"Layer `{layer.name}` has an activity_regularizer. Its loss depends "
                "on the data of the whole batch and is not clipped per example, so "
                "the DP guarantee would not hold. Remove it (weight regularizers "
                "such as kernel_regularizer are fine: they do not depend on data)."
            )
