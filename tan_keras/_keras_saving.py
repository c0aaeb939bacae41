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

SavedModels get the same treatment (`model.export()`, which writes through
`keras.export.ExportArchive`, and `tf.saved_model.load`, through which
`keras.layers.TFSMLayer` loads too): once an archive has gathered what it
will write (`_filter_and_track_resources`), `after_tracking_export(archive)`
may add an entry under `SAVED_MODEL_ENTRY` to the object it saves; once
`tf.saved_model.load` has restored a SavedModel whose root has that entry,
`after_loading_saved_model(root)` reads it. `tf.saved_model.save` of any
other object first calls `before_saving_saved_model(obj)` (which adds the
entry to a `tf.Module`, and refuses what it cannot carry). Every reader of
a TensorFlow checkpoint (`tf.train.load_checkpoint`, `load_variable`,
restores) is given to `after_opening_checkpoint(reader)`, so that tensors
read from it as arrays keep what they went through; before a
`tf.train.Checkpoint` writes, `before_writing_checkpoint(root)` adds a
ledger entry to the plain layers that hold private values. The save hooks
are called only once the hooks module is loaded: before that, no weight
can have a ledger. `keras.saving.KerasFileEditor(path)`, which reads a
`.keras` or `.weights.h5` file's arrays as a tree (`weights_dict`) without
loading them into any object, gives the file and the tree to
`after_reading_weight_file(group, weights_dict)`. Keras's legacy HDF5
writer (`.h5`: `save_model`, `Model.save`, `ModelCheckpoint`) first calls
`before_writing_legacy_h5(model)`, which refuses weights with a ledger
(the format cannot hold one), on either backend.
"""

import functools
import importlib
import sys

_SAVING_LIB = "keras.src.saving.saving_lib"
_EXPORT_ARCHIVE = "keras.src.export.saved_model_export_archive"
_LEGACY_H5 = "keras.src.legacy.saving.legacy_h5_format"
_FILE_EDITOR = "keras.src.saving.file_editor"
_TF_LOAD = "tensorflow.python.saved_model.load"
_TF_SAVE = "tensorflow.python.saved_model.save"
_TF_CHECKPOINT_READER = "tensorflow.python.training.py_checkpoint_reader"
_TF_CHECKPOINT = "tensorflow.python.checkpoint.checkpoint"
_ORIGINAL = "_tan_keras_original"
# The attribute of a SavedModel's root that holds the ledger's entry.
SAVED_MODEL_ENTRY = "_tan_keras_privacy_ledger"


def install(hooks_module: str) -> None:
    """Hooks Keras's weight files and SavedModels to `hooks_module`'s functions (module doc).

    Args:
      hooks_module: The module that defines `after_saving_each_object`,
        `after_loading_each_object`, `after_tracking_export`,
        `after_loading_saved_model` and `before_saving_saved_model`,
        imported at their first call.
    """
    for target, (ready, patch) in _TARGETS.items():
        module = sys.modules.get(target)
        if module is not None and hasattr(module, ready):
            patch(module, hooks_module)
            continue
        for finder in sys.meta_path:
            if isinstance(finder, _PatchOnImport) and finder.target == target:
                finder.hooks_module = hooks_module
                break
        else:
            sys.meta_path.insert(0, _PatchOnImport(hooks_module, target))


class _PatchOnImport:
    """A meta path finder that patches one module (`target`) once it has loaded."""

    def __init__(self, hooks_module: str, target: str = _SAVING_LIB):
        self.hooks_module = hooks_module
        self.target = target

    def find_spec(self, fullname, path, target=None):
        if fullname != self.target:
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
        patch = _TARGETS[self.target][1]

        def exec_module(module):
            execute(module)
            patch(module, hooks_module)

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


def _patch_export(archive_lib, hooks_module: str) -> None:
    archive_class = archive_lib.SavedModelExportArchive
    original = archive_class._filter_and_track_resources
    original = getattr(original, _ORIGINAL, original)

    def _filter_and_track_resources(self, *args, **kwargs):
        # Called by `write_out` right before `tf.saved_model.save`: what the
        # archive will write is gathered, and the entry can join it.
        original(self, *args, **kwargs)
        if hooks_module in sys.modules:
            importlib.import_module(hooks_module).after_tracking_export(self)

    setattr(_filter_and_track_resources, _ORIGINAL, original)
    archive_class._filter_and_track_resources = _filter_and_track_resources


def _patch_tf_load(load_lib, hooks_module: str) -> None:
    # `tf.saved_model.load` (and TFSMLayer through it) calls this module
    # global: a single place that every load goes through.
    original = getattr(load_lib.load_partial, _ORIGINAL, load_lib.load_partial)

    @functools.wraps(original)
    def load_partial(*args, **kwargs):
        loaded = original(*args, **kwargs)
        root = loaded.get("root") if isinstance(loaded, dict) else None
        if root is not None and hasattr(root, SAVED_MODEL_ENTRY):
            importlib.import_module(hooks_module).after_loading_saved_model(root)
        return loaded

    setattr(load_partial, _ORIGINAL, original)
    load_lib.load_partial = load_partial


def _patch_tf_save(save_lib, hooks_module: str) -> None:
    # `tf.saved_model.save` calls this module global (so does ExportArchive).
    original = save_lib.save_and_return_nodes
    original = getattr(original, _ORIGINAL, original)

    @functools.wraps(original)
    def save_and_return_nodes(obj, *args, **kwargs):
        if hooks_module in sys.modules:
            importlib.import_module(hooks_module).before_saving_saved_model(obj)
        return original(obj, *args, **kwargs)

    setattr(save_and_return_nodes, _ORIGINAL, original)
    save_lib.save_and_return_nodes = save_and_return_nodes


def _patch_checkpoint_reader(reader_lib, hooks_module: str) -> None:
    # Every reader of a TensorFlow checkpoint's tensors is made by this module
    # global (`tf.train.load_checkpoint`, `load_variable`, restores).
    original = reader_lib.NewCheckpointReader
    original = getattr(original, _ORIGINAL, original)

    @functools.wraps(original)
    def NewCheckpointReader(filepattern):  # noqa: N802 (TensorFlow's name)
        reader = original(filepattern)
        # A load: the hooks module is imported if it was not (a fresh process).
        importlib.import_module(hooks_module).after_opening_checkpoint(reader)
        return reader

    setattr(NewCheckpointReader, _ORIGINAL, original)
    reader_lib.NewCheckpointReader = NewCheckpointReader


def _patch_checkpoint_saver(checkpoint_lib, hooks_module: str) -> None:
    # `tf.train.Checkpoint.write` / `.save` (and the v1 `tf.train.Checkpoint`)
    # write through this method.
    saver = checkpoint_lib.TrackableSaver
    original = getattr(saver.save, _ORIGINAL, saver.save)

    @functools.wraps(original)
    def save(self, *args, **kwargs):
        if hooks_module in sys.modules:
            importlib.import_module(hooks_module).before_writing_checkpoint(self._graph_view.root)
        return original(self, *args, **kwargs)

    setattr(save, _ORIGINAL, original)
    saver.save = save


def _patch_legacy_h5(h5_lib, hooks_module: str) -> None:
    # Keras's legacy HDF5 writer: `save_model` (and so `Model.save`,
    # `ModelCheckpoint`) calls `save_model_to_hdf5` through this module;
    # `save_weights_to_hdf5_group` writes the weights of any model.
    for name in ("save_model_to_hdf5", "save_weights_to_hdf5_group"):
        original = getattr(h5_lib, name)
        original = getattr(original, _ORIGINAL, original)
        model_at = 0 if name == "save_model_to_hdf5" else 1

        def writer(*args, _original=original, _at=model_at, **kwargs):
            model = args[_at] if len(args) > _at else kwargs.get("model")
            if hooks_module in sys.modules:
                importlib.import_module(hooks_module).before_writing_legacy_h5(model)
            return _original(*args, **kwargs)

        functools.update_wrapper(writer, original)
        setattr(writer, _ORIGINAL, original)
        setattr(h5_lib, name, writer)


def _patch_file_editor(editor_lib, hooks_module: str) -> None:
    # `keras.saving.KerasFileEditor(path)` reads every array of a `.keras` or
    # `.weights.h5` file into `weights_dict` at construction, past
    # `_load_state` (no object to load into), through this method: its
    # outermost call (`inner_path` "") gets the file's root, still open.
    editor = editor_lib.KerasFileEditor
    original = editor._extract_weights_from_store
    original = getattr(original, _ORIGINAL, original)

    @functools.wraps(original)
    def _extract_weights_from_store(self, data, metadata=None, inner_path=""):
        found = original(self, data, metadata=metadata, inner_path=inner_path)
        if inner_path == "":
            # A load: the hooks module is imported if it was not (a fresh process).
            importlib.import_module(hooks_module).after_reading_weight_file(data, found[0])
        return found

    setattr(_extract_weights_from_store, _ORIGINAL, original)
    editor._extract_weights_from_store = _extract_weights_from_store


# The modules hooked: {name: (an attribute it has once loaded, its patch)}.
_TARGETS = {
    _SAVING_LIB: ("_load_state", _patch),
    _EXPORT_ARCHIVE: ("SavedModelExportArchive", _patch_export),
    _TF_LOAD: ("load_partial", _patch_tf_load),
    _TF_SAVE: ("save_and_return_nodes", _patch_tf_save),
    _TF_CHECKPOINT_READER: ("NewCheckpointReader", _patch_checkpoint_reader),
    _TF_CHECKPOINT: ("TrackableSaver", _patch_checkpoint_saver),
    _LEGACY_H5: ("save_weights_to_hdf5_group", _patch_legacy_h5),
    _FILE_EDITOR: ("KerasFileEditor", _patch_file_editor),
}
