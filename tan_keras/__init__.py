"""tan_keras: differentially private training for Keras, the TAN way.

DP-SGD with per-example clipping, augmentation multiplicity and Poisson
sampling (`DPKerasModel`, `make_private`, `make_poisson_dataset`), privacy
accounting with the Total Amount of Noise (`tan_keras.privacy`), and the
training program `python -m tan_keras.train`.

Importing `tan_keras` is cheap: the TensorFlow-backed names below load on
first use, so `python -m tan_keras.privacy` runs without TensorFlow.
"""

from tan_keras import _backend, _keras_saving, _lazy

__version__ = "0.1.0"

# Public name -> module that defines it.
_EXPORTS = {
    "DPConfig": "tan_keras.keras_dp.dp_config",
    "DPKerasModel": "tan_keras.keras_dp.dp_model",
    "make_private": "tan_keras.keras_dp.wrap",
    "make_private_with_epsilon": "tan_keras.keras_dp.wrap",
    "PoissonSampler": "tan_keras.mechanism.sampling",
    "make_poisson_dataset": "tan_keras.mechanism.sampling",
    "PrivacyAccountant": "tan_keras.keras_dp.callbacks",
    "DPCheckpoint": "tan_keras.keras_dp.checkpointing",
    "DPCheckpointCallback": "tan_keras.keras_dp.checkpointing",
    "CheckpointError": "tan_keras.keras_dp.checkpointing",
    "NotPrivateWarning": "tan_keras.mechanism.not_private",
    "make_augmenter": "tan_keras.data.augment",
    "make_views": "tan_keras.mechanism.views",
    "mark_public": "tan_keras.mechanism.provenance",
    "private_adapt": "tan_keras.keras_dp.private_adapt",
}

# On Keras's JAX backend the private model is tan_keras.jax_dp's; the names
# that backend does not have yet are refused by name when first read.
_JAX = _backend.configured() == "jax"
_JAX_EXPORTS = {
    "DPConfig": "tan_keras.keras_dp.dp_config",
    "DPKerasModel": "tan_keras.jax_dp.dp_model",
    "make_private": "tan_keras.jax_dp.wrap",
    "make_private_with_epsilon": "tan_keras.jax_dp.wrap",
    "PrivacyAccountant": "tan_keras.keras_dp.callbacks",
    "mark_public": "tan_keras.mechanism.provenance",
    "private_adapt": "tan_keras.keras_dp.private_adapt",
    "NotPrivateWarning": "tan_keras.mechanism.not_private",
}

__getattr__, __dir__, __all__ = _lazy.exports(__name__, _JAX_EXPORTS if _JAX else _EXPORTS)
if _JAX:
    _jax_getattr = __getattr__

    def __getattr__(name):  # noqa: F811
        if name in _EXPORTS and name not in _JAX_EXPORTS:
            raise AttributeError(
                f"tan_keras.{name} needs Keras's TensorFlow backend for now; on the JAX "
                f"backend tan_keras offers {', '.join(sorted(_JAX_EXPORTS))}."
            )
        return _jax_getattr(name)


# Every weight file Keras writes or reads from now on carries the privacy
# ledger (tan_keras/keras_dp/ledger.py, on either backend), even one loaded
# before any other name of the package is used; TensorFlow still loads only
# with Keras, and never on the JAX backend.
_keras_saving.install("tan_keras.keras_dp.ledger")
__all__ = __all__ + ["__version__"]
