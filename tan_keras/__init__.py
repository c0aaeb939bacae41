"""tan_keras: differentially private training for Keras, the TAN way.

DP-SGD with per-example clipping, augmentation multiplicity and Poisson
sampling (`DPKerasModel`, `make_private`, `make_poisson_dataset`), privacy
accounting with the Total Amount of Noise (`tan_keras.privacy`), and the
training program `python -m tan_keras.train`.

Importing `tan_keras` is cheap: the TensorFlow-backed names below load on
first use, so `python -m tan_keras.privacy` runs without TensorFlow.
"""

import importlib

__version__ = "0.1.0"

# Public name -> module that defines it.
_EXPORTS = {
    "DPConfig": "tan_keras.dp_config",
    "DPKerasModel": "tan_keras.dp_model",
    "make_private": "tan_keras.dp_model",
    "PoissonSampler": "tan_keras.sampling",
    "make_poisson_dataset": "tan_keras.sampling",
    "PrivacyAccountant": "tan_keras.callbacks",
    "DPCheckpoint": "tan_keras.checkpointing",
    "DPCheckpointCallback": "tan_keras.checkpointing",
    "CheckpointError": "tan_keras.checkpointing",
    "NotPrivateWarning": "tan_keras.noise",
    "make_augmenter": "tan_keras.augment",
    "make_views": "tan_keras.augment",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tan_keras' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
