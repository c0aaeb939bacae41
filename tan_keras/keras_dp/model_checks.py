"""Refuses models whose layers would leak information across examples.

DP-SGD bounds each example's influence through its clipped gradient only.
Layers that mix examples (BatchNormalization normalizes with batch statistics)
or keep state updated from data (moving means, activity regularizers feeding
data-dependent losses) leak outside that bound, so they are refused with an
error that says why and what to use instead. State updates are found by
behaviour, whatever the layer's class: one training-mode call is traced and
every variable it writes is reported (`model_analysis.state_updates`).
"""

import keras

from tan_keras import _keras_internals
from tan_keras.mechanism import model_analysis

_BATCH_NORM_HINT = (
    "BatchNormalization mixes the examples of a batch (each output depends on the "
    "batch mean and variance) and updates moving statistics from the data; neither "
    "is covered by per-example clipping, so the DP guarantee would not hold. Use "
    "keras.layers.GroupNormalization (e.g. groups=16) or LayerNormalization, or "
    "weight-standardized convolutions as in tan_keras.models.nf_resnet50."
)


def check_model_is_dp_compatible(model: keras.Model) -> None:
    """Raises if `model` contains a layer that breaks per-example privacy.

    Args:
      model: The Keras model to be trained with DP-SGD.

    Raises:
      ValueError: naming the first offending layer, saying why it breaks the
        guarantee and what to use instead: BatchNormalization,
        an activity regularizer, or any layer whose training-mode call writes
        a variable (found by tracing one call, see `model_analysis`).
    """
    for layer in _keras_internals.all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
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
    for write in model_analysis.state_updates(model):
        where = "Code outside every layer"
        if write.layer is not None:
            where = f"Layer `{write.layer}` ({write.layer_type})"
        raise ValueError(
            f"{where} writes the variable `{write.resource}` (op {write.op_type}) when "
            "called in training mode, so it cannot be trained with DP-SGD: values "
            "computed from single examples would be written into the model's weights "
            "(and saved with them) unclipped and un-noised, outside the per-example "
            "bound of DP-SGD. Keep such state fixed during training (a non-trainable "
            "weight that is only read is fine), compute statistics on public data "
            "beforehand, or use a layer without data-dependent state (e.g. "
            "GroupNormalization instead of BatchNormalization)."
        )
