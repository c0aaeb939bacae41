"""tan_keras: differentially private training for Keras, the TAN way.

DP-SGD with per-example clipping, augmentation multiplicity and Poisson
sampling (`DPKerasModel`, `make_private`, `make_poisson_dataset`), privacy
accounting with the Total Amount of Noise (`tan_keras.privacy`), and the
training program `python -m tan_keras.train`.

Importing `tan_keras` is cheap: the TensorFlow-backed names below load on
first use, so `python -m tan_keras.privacy` runs without TensorFlow.
"""

from tan_keras import _keras_saving, _lazy

__version__ = "0.1.0"

# Public name -> module that defines it.
_EXPORTS = {
    "DPConfig": "tan_keras.keras_dp.dp_config",
    "DPKerasModel": "tan_keras.keras_dp.dp_model",
    "make_private": "tan_keras.keras_dp.dp_model",
    "make_private_with_epsilon": "tan_keras.keras_dp.budget",
    "PoissonSampler": "tan_keras.mechanism.sampling",
    "make_poisson_dataset": "tan_keras.mechanism.sampling",
    "PrivacyAccountant": "tan_keras.keras_dp.callbacks",
    "DPCheckpoint": "tan_keras.keras_dp.checkpointing",
    "DPCheckpointCallback": "tan_keras.keras_dp.checkpointing",
    "CheckpointError": "tan_keras.keras_dp.checkpointing",
    "NotPrivateWarning": "tan_keras.mechanism.noise",
    "make_augmenter": "tan_keras.data.augment",
    "make_views": "tan_keras.mechanism.views",
    "mark_public": "tan_keras.mechanism.provenance",
    "private_adapt": "tan_keras.keras_dp.private_adapt",
}

__getattr__, __dir__, __all__ = _lazy.exports(__name__, _EXPORTS)

# Every weight file Keras writes or reads from now on carries the privacy
# ledger (tan_keras/keras_dp/ledger.py), even one loaded before any other
# name of the package is used; TensorFlow still loads only with Keras.
_keras_saving.install("tan_keras.keras_dp.ledger")
__all__ = __all__ + ["__version__"]
