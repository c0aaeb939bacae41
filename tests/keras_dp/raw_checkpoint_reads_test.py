"""Private values written or read by TensorFlow's lower-level routes keep their ledger.

Review round 8 escapes: a private model's weights reached a fresh process
with no ledger through
- `tf.saved_model.save` of a `tf.Module` holding the private model, the
  model it wraps, or bare variables (01; the first two crashed with a bare
  `NotImplementedError` from the ledger's checkpoint tensor);
- `tf.train.load_checkpoint(path).get_tensor(name)` / `tf.train.load_variable`
  of a private model's checkpoint, the arrays set into a rebuilt model (02);
- `tf.train.Checkpoint(model=clone)` of a plain clone holding the private
  values, or `tf.train.Checkpoint(weights=model.weights)` (12).

Each case writes the file, forgets what this process remembers (what a
fresh process knows), reads the values back into a rebuilt model and makes
it private: it must count the updates the values went through. Each has a
power check: without the hook that carries the ledger, it counts 0.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from _helpers import dense_model, forget_remembered_values, trained_dense_private

import tan_keras
from tan_keras.keras_dp import ledger as ledger_lib

N, B = 64, 16
DP = dict(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=B, dataset_size=N)
STEPS = 3


@pytest.fixture(scope="module")
def _shared():
    return trained_dense_private(N, B, STEPS, DP)


@pytest.fixture
def _trained(_shared):
    """(private model trained STEPS updates, the model it wraps), its values remembered."""
    private, base = _shared
    ledger_lib.remember(private.weights, private.privacy_ledger, unless={})
    return private, base


_forget_this_process = forget_remembered_values


def _counted(values):
    """dp_steps of a rebuilt model made private after `set_weights(values)`."""
    rebuilt = dense_model(seed=7)
    rebuilt.set_weights([np.asarray(v) for v in values])
    return int(tan_keras.make_private(rebuilt, **DP).dp_steps.numpy())


def _kernels_first(variables):
    """[kernel, bias, kernel, bias] of the dense model, from a flat list of its variables."""
    values = [v.numpy() for v in variables]
    kernels = [v for v in values if v.ndim == 2]
    biases = [v for v in values if v.ndim == 1]
    return [kernels[0], biases[0], kernels[1], biases[1]]


@pytest.mark.parametrize("power_check", [False, True])
@pytest.mark.parametrize("held", ["private", "wrapped", "variables"])
def test_tf_saved_model_save_of_a_module_carries_the_ledger(
    held, power_check, _trained, tmp_path, monkeypatch
):
    private, base = _trained
    if power_check:  # no entry added, no table read
        monkeypatch.setattr(ledger_lib, "_add_saved_model_entry", lambda root, keras_of: None)
        monkeypatch.setattr(ledger_lib, "after_opening_checkpoint", lambda reader: None)
    module = tf.Module()
    if held == "variables":
        module.weights = list(base.weights)
    else:
        module.model = private if held == "private" else base
    path = str(tmp_path / "saved")
    tf.saved_model.save(module, path)  # used to raise a bare NotImplementedError
    _forget_this_process()
    loaded = tf.saved_model.load(path)
    found = ledger_lib._saved_variables(loaded)
    values = _kernels_first([v for v in found if v.dtype == tf.float32 and v.shape.rank])
    assert _counted(values) == (0 if power_check else STEPS)


@pytest.mark.parametrize("power_check", [False, True])
@pytest.mark.parametrize("read", ["get_tensor", "load_variable"])
def test_tensors_read_from_a_private_checkpoint_keep_the_ledger(
    read, power_check, _trained, tmp_path, monkeypatch
):
    private, _ = _trained
    if power_check:
        monkeypatch.setattr(ledger_lib, "after_opening_checkpoint", lambda reader: None)
    path = tf.train.Checkpoint(model=private).write(str(tmp_path / "ckpt"))
    _forget_this_process()
    names = [n for n, _ in tf.train.list_variables(path) if "VARIABLE_VALUE" in n]
    names = [n for n in names if "optimizer" not in n and "dp_" not in n]
    if read == "get_tensor":
        reader = tf.train.load_checkpoint(path)
        arrays = {n: reader.get_tensor(n) for n in names}
    else:
        arrays = {n: tf.train.load_variable(path, n) for n in names}
    variables = [tf.Variable(a) for a in arrays.values() if a.ndim]
    assert _counted(_kernels_first(variables)) == (0 if power_check else STEPS)


@pytest.mark.parametrize("power_check", [False, True])
@pytest.mark.parametrize("written", ["clone", "bare_variables"])
def test_a_checkpoint_of_private_values_without_a_ledger_gets_one(
    written, power_check, _trained, tmp_path, monkeypatch
):
    private, base = _trained
    if power_check:
        monkeypatch.setattr(ledger_lib, "before_writing_checkpoint", lambda root: None)
    clone = keras.models.clone_model(base)
    clone.set_weights(private.get_weights()[: len(clone.weights)])
    if written == "clone":
        path = tf.train.Checkpoint(model=clone).write(str(tmp_path / "ckpt"))
    else:
        path = tf.train.Checkpoint(weights=clone.weights).write(str(tmp_path / "ckpt"))
    # The clone stays a plain model: it trains plainly as before.
    assert not ledger_lib.has_ledger(clone.trainable_variables)
    _forget_this_process()
    rebuilt = dense_model(seed=7)
    if written == "clone":
        tf.train.Checkpoint(model=rebuilt).read(path).expect_partial()
    else:
        tf.train.Checkpoint(weights=rebuilt.weights).read(path).expect_partial()
    assert int(tan_keras.make_private(rebuilt, **DP).dp_steps.numpy()) == (
        0 if power_check else STEPS
    )
