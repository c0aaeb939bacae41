"""Ledger escapes of the sixth review (the ledger bound to the weights), as tests.

* a103: the load hook was installed at the first use of a lazy export
  (`make_private`): a plain Keras file loaded right after `import tan_keras`
  lost its ledger. It is installed at `import tan_keras` now.
* a107: remembering a value again replaced what was known of it: a second
  model that held the same values (a warm start) made them count its own,
  shorter history. Segments are merged per uid by maximum now.
* a102: a file's values copied as arrays into a rebuilt model were not
  recognised (only training remembered fingerprints). Loading a file or
  checkpoint with a ledger remembers the values it loaded now.
* a101: `clone_model` + `set_weights(private.get_weights())` + `save` wrote
  a file without a ledger. A plain layer whose values are remembered writes
  their segments into the file now.
* a106: weights set by a callback's `on_train_begin` / `on_epoch_begin`
  came after `fit` looked the weights up. They are looked up again after the
  callbacks, before the first update.
* a104(i): a trainable `TFSMLayer` (a SavedModel, with no ledger) is refused.

Every test has a power check: the same scenario with the old behaviour
fails it.
"""

import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from _helpers import LOSS, dense_model

import tan_keras
from tan_keras.keras_dp import checkpointing, dp_state, model_checks
from tan_keras.keras_dp import ledger as ledger_lib
from tan_keras.mechanism import sampling

N, B = 64, 16
DP = dict(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=B, dataset_size=N)


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(N, 4)).astype(np.float32), rng.integers(0, 3, N).astype(np.int32)


def _private(model):
    private = tan_keras.make_private(model, **DP)
    private.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    return private


def _train(private, steps, callbacks=()):
    x, y = _data()
    sampler = sampling.PoissonSampler(N, B, physical_batch_size=N, pad_steps=True)
    # pad_steps: every step is one micro-batch, so the fit runs `steps` updates.
    private.fit(
        sampling.make_poisson_dataset(x, y, sampler),
        steps_per_epoch=steps,
        verbose=0,
        callbacks=list(callbacks),
    )
    return steps


def _steps_of(model):
    ledger = ledger_lib.ledger_of(model.weights)
    return 0 if ledger is None else ledger.total_steps()


def _forget_this_process():
    """What a fresh process knows: no remembered weights."""
    ledger_lib._REMEMBERED.clear()
    ledger_lib._LOADED.clear()


# ------------------------------------------------------------------ a103
_CHILD = """
import sys
{first}
{power_check}
{second}
m = keras.models.load_model({path!r})
assert "tan_keras.keras_dp.dp_model" not in sys.modules
from tan_keras.keras_dp import ledger
found = ledger.ledger_of(m.weights)
print("STEPS", 0 if found is None else found.total_steps())
"""
# The old behaviour: no hook until a lazy export loads the ledger module.
_NO_HOOK_AT_IMPORT = (
    "sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != '_PatchOnImport']"
)


@pytest.mark.parametrize(
    "order,power_check",
    [("tan_keras_first", False), ("keras_first", False), ("tan_keras_first", True)],
)
def test_a_plain_file_loaded_right_after_import_tan_keras_brings_its_ledger(
    order, power_check, tmp_path
):
    private = _private(dense_model())
    n = _train(private, 2)
    path = str(tmp_path / "extractor.keras")
    keras.Model(private.inputs, private.layers[-2].output).save(path)
    imports = ["import tan_keras", "import keras"]
    if order == "keras_first":
        imports.reverse()
    code = _CHILD.format(
        first=imports[0],
        second=imports[1],
        power_check=_NO_HOOK_AT_IMPORT if power_check else "",
        path=path,
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    steps = int(result.stdout.split("STEPS")[-1])
    assert steps == (0 if power_check else n)


def test_import_tan_keras_still_loads_no_tensorflow():
    code = "import sys, tan_keras; print('tensorflow' in sys.modules or 'keras' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip().splitlines()[-1] == "False"


# ------------------------------------------------------------------ a107
@pytest.mark.parametrize("power_check", [False, True])
def test_remembering_a_value_again_never_shrinks_its_history(power_check, monkeypatch):
    if power_check:  # the former memory: the latest remember replaced the entry
        monkeypatch.setattr(ledger_lib, "_merged", lambda known, segments: segments)
    a = _private(dense_model())
    _train(a, 3)
    b = _private(dense_model(seed=1))
    _train(b, 1)
    # B holds A's values (a warm start) and remembers them with its ledger.
    ledger_lib.remember(a.weights, b.privacy_ledger, unless={})
    copy = dense_model(seed=2)
    copy.set_weights(a.get_weights())
    assert _private(copy).privacy_ledger.total_steps() == (1 if power_check else 3 + 1)


# ------------------------------------------------------------------ a102
def _load(route, private, path, tmp_path):
    """Writes `private`'s weights by `route`, forgets the process, reads them back."""
    if route == "keras":
        private.save(path + ".keras")
    elif route == "weights":
        private.save_weights(path + ".weights.h5")
    elif route == "tf_checkpoint":
        saved = tf.train.Checkpoint(model=private).write(path)
    else:
        ckpt = checkpointing.DPCheckpoint(str(tmp_path / "dp"), private)
        ckpt.save()
    _forget_this_process()
    if route == "keras":
        return keras.models.load_model(path + ".keras")
    loaded = dense_model(seed=1)
    if route == "weights":
        loaded.load_weights(path + ".weights.h5")
    elif route == "tf_checkpoint":
        tf.train.Checkpoint(model=_private(loaded)).read(saved).expect_partial()
    else:
        checkpointing.DPCheckpoint(str(tmp_path / "dp"), _private(loaded)).restore()
    return loaded


@pytest.mark.parametrize("power_check", [False, True])
@pytest.mark.parametrize("route", ["keras", "weights", "tf_checkpoint", "dp_checkpoint"])
def test_values_loaded_from_a_file_then_copied_as_arrays_are_recognised(
    route, power_check, tmp_path, monkeypatch
):
    if power_check:  # the former loads: only training remembered values
        monkeypatch.setattr(ledger_lib, "_remember_loaded", lambda variables, segments: None)
        monkeypatch.setattr(ledger_lib, "after_opening_checkpoint", lambda reader: None)
    private = _private(dense_model())
    n = _train(private, 3)
    loaded = _load(route, private, str(tmp_path / "private"), tmp_path)
    assert _steps_of(loaded) == n
    copy = dense_model(seed=2)
    copy.set_weights(loaded.get_weights()[:4])
    assert np.array_equal(copy.get_weights()[0], private.get_weights()[0])
    assert _private(copy).privacy_ledger.total_steps() == (0 if power_check else n)


# ------------------------------------------------------------------ a101
@pytest.mark.parametrize("power_check", [False, True])
@pytest.mark.parametrize("fmt", ["keras", "weights"])
def test_a_plain_clone_of_private_weights_saves_their_ledger(
    fmt, power_check, tmp_path, monkeypatch
):
    if power_check:  # the former saves: only layers bound to a ledger wrote one
        monkeypatch.setattr(ledger_lib, "_write_to_file", lambda obj, make: None)
    inner = dense_model()
    private = _private(inner)
    n = _train(private, 3)
    clone = keras.models.clone_model(inner)
    clone.set_weights(private.get_weights())
    assert ledger_lib.ledger_of(clone.weights) is None
    if fmt == "keras":
        clone.save(tmp_path / "clone.keras")
    else:
        clone.save_weights(tmp_path / "clone.weights.h5")
    _forget_this_process()
    if fmt == "keras":
        loaded = keras.models.load_model(tmp_path / "clone.keras")
    else:
        loaded = dense_model(seed=5)
        loaded.load_weights(tmp_path / "clone.weights.h5")
    assert _private(loaded).privacy_ledger.total_steps() == (0 if power_check else n)


def test_a_plain_model_with_unknown_values_saves_no_ledger(tmp_path):
    _train(_private(dense_model()), 1)  # some values are remembered
    plain = dense_model(seed=3)
    plain.save_weights(tmp_path / "plain.weights.h5")
    loaded = dense_model(seed=4)
    loaded.load_weights(tmp_path / "plain.weights.h5")
    assert ledger_lib.ledger_of(loaded.weights) is None


# ------------------------------------------------------------------ a106
class _WarmStart(keras.callbacks.Callback):
    def __init__(self, weights, hook):
        super().__init__()
        self._weights = weights
        setattr(self, hook, self._set)

    def _set(self, *args, **kwargs):
        self.model.set_weights(self._weights)


@pytest.mark.parametrize("power_check", [False, True])
@pytest.mark.parametrize("hook", ["on_train_begin", "on_epoch_begin"])
def test_weights_set_when_training_starts_bring_their_ledger(hook, power_check, monkeypatch):
    if power_check:  # the former fit: looked up before the callbacks ran only
        monkeypatch.setattr(dp_state.WeightsRecall, "_recall", lambda self: None)
    a = _private(dense_model())
    n = _train(a, 3)
    b = _private(dense_model(seed=1))
    _train(b, 2, callbacks=[_WarmStart(a.get_weights(), hook)])
    assert b.privacy_ledger.total_steps() == (2 if power_check else n + 2)


# ------------------------------------------------------------------ a104(i)
@pytest.fixture(scope="module")
def _exported(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("export") / "saved")
    dense_model().export(path, verbose=False)
    return path


@pytest.mark.parametrize("power_check", [False, True])
def test_a_trainable_tfsm_layer_is_refused(power_check, _exported, monkeypatch):
    if power_check:
        monkeypatch.setattr(model_checks, "_is_tfsm_layer", lambda layer: False)
    inputs = keras.Input((4,))
    layer = keras.layers.TFSMLayer(_exported, call_endpoint="serve", trainable=True)
    model = keras.Model(inputs, layer(inputs))
    if power_check:
        tan_keras.make_private(model, **DP)
        return
    with pytest.raises(ValueError, match=r"`.*` \(TFSMLayer\).*\.keras.*trainable=False"):
        tan_keras.make_private(model, **DP)


def test_a_frozen_tfsm_layer_is_accepted(_exported):
    inputs = keras.Input((4,))
    frozen = keras.layers.TFSMLayer(_exported, call_endpoint="serve", trainable=False)
    head = keras.layers.Dense(2)(frozen(inputs))
    tan_keras.make_private(keras.Model(inputs, head), **DP)
