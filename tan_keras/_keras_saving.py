"""Hooks in Keras's weight files, installed at `import tan_keras`.

Keras 3 saves and loads `.keras` and `.weights.h5` files (`save`,
`save_weights`, `load_model`, `load_weights`, the callbacks that use them)
object by object (`saving_lib._save_state`, `_load_state`). These hooks
run after each object: `after_saving_each_object(obj, make)` and
`after_loading_each_object(obj, read)` of the module named at `install`
(the privacy ledger's), where `make(name)` / `read(name)` give the store
of `obj`'s entry `name` (`read`'s is empty if the file has none).

A private Keras API like those of `_keras_internals`, kept apart because
it must load without Keras: `import tan_keras` stays free of TensorFlow,
yet a file loaded right after it (before any other tan_keras name is used)
must bring its ledger back. So the hooks go into Keras's saving library
the moment it loads (at once, if it already has), and the module they call
is imported at their first call, when Keras is fully loaded.
"""

import importlib
import sys

_SAVING_LIB = "keras.src.saving.saving_lib"
_ORIGINAL = "_tan_keras_original"


def install(hooks_module: str) -> None:
    """Hooks Keras's weight files to `hooks_module`'s functions (see module doc).

    Args:
      hooks_module: The module that defines `after_saving_each_object` and
        `after_loading_each_object`, imported at their first call.
    """
    saving_lib = sys.modules.get(_SAVING_LIB)
    if saving_lib is not None and hasattr(saving_lib, "_load_state"):
        _patch(saving_lib, hooks_module)
        return
    for finder in sys.meta_path:
        if isinstance(finder, _PatchOnImport):
            finder.hooks_module = hooks_module
            return
    sys.meta_path.insert(0, _PatchOnImport(hooks_module))


class _PatchOnImport:
    """A meta path finder that patches Keras's saving library once it has loaded."""

    def __init__(self, hooks_module: str):
        self.hooks_module = hooks_module

    def find_spec(self, fullname, path, target=None):
        if fullname != _SAVING_LIB:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        execute = loader.exec_module
        hooks_module = self.hooks_module

        def exec_module(module):
            execute(module)
            _patch(module, hooks_module)

        # This spec's loader only (a loader object per module file).
        loader.exec_module = exec_module
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        return spec


def _patch(saving_lib, hooks_module: str) -> None:
    from keras.src.utils import file_utils  # loaded by saving_lib already

    def entry(inner_path, name):
        return file_utils.join(inner_path, name).replace("\\", "/")

    def hooks():
        return importlib.import_module(hooks_module)

    load_original = getattr(saving_lib._load_state, _ORIGINAL, saving_lib._load_state)
    save_original = getattr(saving_lib._save_state, _ORIGINAL, saving_lib._save_state)

    def load_state(saveable, weights_store, assets_store, inner_path, *args, **kwargs):
        load_original(saveable, weights_store, assets_store, inner_path, *args, **kwargs)
        if weights_store is not None:
            hooks().after_loading_each_object(
                saveable, lambda name: weights_store.get(entry(inner_path, name))
            )

    def save_state(saveable, weights_store, assets_store, inner_path, visited_saveables):
        # An object met twice is saved once, at its first path.
        seen = id(saveable) in visited_saveables
        save_original(saveable, weights_store, assets_store, inner_path, visited_saveables)
        if weights_store is not None and not seen:
            hooks().after_saving_each_object(
                saveable, lambda name: weights_store.make(entry(inner_path, name))
            )

    setattr(load_state, _ORIGINAL, load_original)
    setattr(save_state, _ORIGINAL, save_original)
    saving_lib._load_state = load_state
    saving_lib._save_state = save_state
