"""Models for private training: no BatchNorm anywhere.

Every model is a functional `keras.Model` built from `keras.Input` that
returns logits, so the training code can rewrap it as
`DPKerasModel(inputs=model.inputs, outputs=model.outputs)`. No layer keeps
state updated from data (BatchNorm would mix examples inside a batch and void
the per-example sensitivity bound of DP-SGD).

The names below load on first use: `tan_keras.models.names` (the names the
program's flags accept) is read before TensorFlow loads.
"""

from tan_keras import _lazy

_EXPORTS = {
    "MODEL_NAMES": "tan_keras.models.names",
    "WSConv2D": "tan_keras.models.ws_conv",
    "build_model": "tan_keras.models.build",
    "nf_resnet50": "tan_keras.models.nf_resnet",
    "small_cnn": "tan_keras.models.cnn",
    "wide_resnet": "tan_keras.models.wrn",
}

__getattr__, __dir__, __all__ = _lazy.exports(__name__, _EXPORTS)
