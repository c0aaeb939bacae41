"""Every private Keras API tan_keras relies on, in one place.

Keras has no public route for these. Keeping them here means a new Keras
release (the Keras 3 port) is one file's work, and nothing else in the
package imports from `keras.src`.
"""

from typing import Any, Dict, List, Tuple

import tensorflow as tf
from keras.src.engine import functional
from keras.src.layers.normalization.batch_normalization import BatchNormalizationBase
from keras.src.saving import serialization_lib


def all_layers(model: tf.keras.layers.Layer, include_self: bool = False) -> List[Any]:
    """Every layer inside `model`, nested models' layers included, each once.

    Args:
      model: A Keras model or layer.
      include_self: Whether `model` itself is listed (first).

    Returns:
      The layers, outer ones first.
    """
    return list(model._flatten_layers(include_self=include_self, recursive=True))


def functional_types() -> Tuple[type, ...]:
    """The container classes of functional and Sequential models."""
    return (functional.Functional, tf.keras.Sequential)


def network_config(model: tf.keras.Model) -> Dict[str, Any]:
    """The layer-graph config of a functional model (what `Functional.get_config` returns).

    Keras 2.15 drops the layer graph for Functional subclasses with a custom
    `__init__`, so a subclass asks for it explicitly.
    """
    return functional.get_network_config(
        model, config={"name": model.name, "trainable": model.trainable}
    )


def network_from_config(config: Dict[str, Any], custom_objects=None):
    """(inputs, outputs) rebuilt from `network_config`'s output."""
    inputs, outputs, _ = functional.reconstruct_from_config(config, custom_objects)
    return inputs, outputs


def deserialize(config: Any) -> Any:
    """Keras objects (losses, optimizers, metrics...) from their serialized config."""
    return serialization_lib.deserialize_keras_object(config)


def batch_norm_base() -> type:
    """The base class of every Keras 2 BatchNormalization (v1, v2, sync, legacy)."""
    return BatchNormalizationBase
