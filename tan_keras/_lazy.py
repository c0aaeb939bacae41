"""Names a package exports from its modules, each loaded on first use.

`import tan_keras` and `import tan_keras.models` stay cheap: a module that
imports TensorFlow loads only when one of its names is first read.
"""

import importlib
from typing import Callable, Dict, List, Tuple


def exports(package: str, names: Dict[str, str]) -> Tuple[Callable, Callable, List[str]]:
    """The module-level `__getattr__`, `__dir__` and `__all__` of a package.

    Args:
      package: The package's name, for error messages.
      names: Public name -> the module that defines it.

    Returns:
      (__getattr__, __dir__, __all__), to assign at the package's top level.
    """
    public = sorted(names)

    def getattr_(name):
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        try:
            loaded = importlib.import_module(module)
        except ModuleNotFoundError as error:
            if (error.name or "").split(".")[0] != "tensorflow":
                raise
            raise ImportError(
                f"{package}.{name} runs on Keras's TensorFlow backend, and TensorFlow is not "
                'installed: pip install "tan_keras[tensorflow]". On the JAX backend (no '
                'TensorFlow): pip install "tan_keras[jax]" and set KERAS_BACKEND=jax.'
            ) from error
        value = getattr(loaded, name)
        # Cached in the package, so the lookup runs once per name.
        setattr(importlib.import_module(package), name, value)
        return value

    def dir_():
        return public

    return getattr_, dir_, public
