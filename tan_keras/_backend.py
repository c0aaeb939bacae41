"""Which Keras backend this process will use, read without importing Keras.

Importing Keras on its TensorFlow backend imports TensorFlow, which a JAX-only
machine does not have; the package's import must stay cheap on both.
"""

import json
import os
import sys


def configured() -> str:
    """The backend Keras will load: KERAS_BACKEND, else keras.json, else "tensorflow".

    Returns:
      The backend's name, as `keras.backend.backend()` will report it.
    """
    name = os.environ.get("KERAS_BACKEND")
    if name:
        return name
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json"), encoding="utf-8") as f:
            return json.load(f).get("backend", "tensorflow")
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


def in_use() -> str:
    """The backend of this process: Keras's own once it is imported, else `configured()`."""
    keras = sys.modules.get("keras")
    if keras is not None and hasattr(keras, "backend"):
        return keras.backend.backend()
    return configured()
