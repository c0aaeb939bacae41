"""Registers the package's own layers with the per-example gradient routes.

WSConv2D computes a Conv2D with a standardized kernel: its per-example
gradients in closed form are the Conv2D rule's on that kernel, pulled back to
(kernel, gain). The layer modules themselves import Keras alone (the
benchmark builds them on TF Privacy's Keras 2 too); the Keras wiring
(`tan_keras.keras_dp.dp_model`) imports this module, so every private model
has the rules.
"""

from tan_keras.mechanism import layerwise
from tan_keras.models.ws_conv import WSConv2D

layerwise.register_reparametrized_conv(
    WSConv2D,
    layerwise.ReparametrizedConv(
        weights=lambda layer: [layer.kernel, layer.gain],
        effective_kernel=lambda layer: layer.standardized_kernel(),
    ),
)
