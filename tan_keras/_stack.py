"""The Keras the package's TensorFlow part runs on: Keras 3, TensorFlow backend.

That part's DP-SGD is built from TensorFlow ops (`tf.vectorized_map`,
gradient tapes, `tf.distribute`), so another Keras backend, or the legacy
Keras 2 package behind `tf.keras`, would not just be slower: the train step
would not exist. Both are refused when it is imported. (On the JAX backend
the package uses `tan_keras.jax_dp`, which never imports this module.)
"""

import os

import keras

_LEGACY_VALUES = ("1", "true", "yes")


def check_keras() -> None:
    """Raises unless Keras 3 runs on the TensorFlow backend.

    Raises:
      ImportError: naming what was found and how to fix it: Keras 2 installed,
        another backend (KERAS_BACKEND), or TF_USE_LEGACY_KERAS set (it makes
        `tf.keras` the legacy tf_keras package, whose models cannot be mixed
        with Keras 3's).
    """
    major = keras.__version__.split(".")[0]
    if major != "3":
        raise ImportError(
            f"tan_keras needs Keras 3 (keras>=3.13); found keras {keras.__version__}. "
            'Install tan_keras\'s requirements: pip install -U "tan_keras[tensorflow]".'
        )
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise ImportError(
            "This part of tan_keras needs Keras's TensorFlow backend (its DP-SGD step is "
            f"written with TensorFlow ops); Keras runs on {backend!r}. Set "
            "KERAS_BACKEND=tensorflow before importing keras"
            + (
                ", or use what the JAX backend offers (tan_keras.DPKerasModel, "
                "tan_keras.make_private)."
                if backend == "jax"
                else "."
            )
        )
    legacy = os.environ.get("TF_USE_LEGACY_KERAS", "").strip().lower()
    if legacy in _LEGACY_VALUES:
        raise ImportError(
            f"TF_USE_LEGACY_KERAS={os.environ['TF_USE_LEGACY_KERAS']!r} makes tf.keras the "
            "legacy Keras 2 package (tf_keras), whose models and layers cannot be trained "
            "by tan_keras (Keras 3). Unset it and build models with `import keras`."
        )


check_keras()
