"""Recording a layer's inputs and pre-activation outputs during a forward pass.

Per-example weight gradients of Dense and Conv2D layers can be formed from
the layer's input `a` and the gradient `g` of the loss with respect to its
pre-activation output `z` (layerwise.py materializes them, ghost.py only takes
their norms); an Embedding's from its token ids `a` and the gradient `g` with
respect to the rows it looked up (it has no activation: `z` is its output).
A tape gives `g` when `z` is a tensor computed under it, so
while a `recording` is active each chosen layer's `call` also appends
`Tap(layer, a, z)` to a list, and applies its activation to `z` outside the
layer so that `z` itself is the pre-activation tensor.
"""

import contextlib
from typing import Iterable, List, NamedTuple

import keras
import tensorflow as tf


class Tap(NamedTuple):
    """One call of a recorded layer.

    Attributes:
      layer: The layer that was called.
      inputs: Its input tensor.
      output: Its output before the activation (the activation's input).
    """

    layer: keras.layers.Layer
    inputs: tf.Tensor
    output: tf.Tensor


@contextlib.contextmanager
def recording(layers: Iterable[keras.layers.Layer], taps: List[Tap]):
    """While active, every call of one of `layers` appends a `Tap` to `taps`.

    Args:
      layers: Layers whose `call` takes one input tensor (Dense, Conv2D,
        Embedding, ...).
      taps: The list to append to, in call order.

    Yields:
      None. The layers' own `call` methods are restored on exit.
    """
    patched = []
    for layer in layers:
        original = layer.call

        def call(inputs, *args, _layer=layer, _original=original, **kwargs):
            activation = getattr(_layer, "activation", None)
            if activation is None:
                out = _original(inputs, *args, **kwargs)
                taps.append(Tap(_layer, inputs, out))
                return out
            _layer.activation = keras.activations.linear
            try:
                z = _original(inputs, *args, **kwargs)
            finally:
                _layer.activation = activation
            taps.append(Tap(_layer, inputs, z))
            return activation(z)

        layer.call = call
        patched.append((layer, original))
    try:
        yield
    finally:
        for layer, original in patched:
            layer.call = original
