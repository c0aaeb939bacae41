"""The privacy ledger travels in SavedModels (`model.export()`, `ExportArchive`).

Review escape a02: a privately trained model exported with `model.export`,
loaded in a fresh process with `tf.saved_model.load`, and its variables
copied into a rebuilt model (`set_weights`) then `make_private`d, started
again from 0 steps. An export now carries the ledger segments of the
variables it holds (`ledger._write_to_saved_model`), `tf.saved_model.load`
remembers the loaded values with them (`ledger._restore_from_saved_model`),
and `tf.saved_model.save` of a Keras model with a ledger, which cannot
carry it, is refused.

Every test has a power check: the same scenario without the hook (or with
a leaking archive) fails it.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from _helpers import dense_model, forget_remembered_values, trained_dense_private

import tan_keras
from tan_keras.keras_dp import ledger as ledger_lib
from tan_keras.privacy import releases

N, B = 64, 16
DP = dict(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=B, dataset_size=N)
STEPS = 3


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(N, 4)).astype(np.float32), rng.integers(0, 3, N).astype(np.int32)


@pytest.fixture(scope="module")
def _shared():
    return trained_dense_private(N, B, STEPS, DP)


@pytest.fixture
def _trained(_shared):
    """(a private model trained for STEPS noisy updates, the plain model it wraps).

    Trained once for the module; the values its fit remembered, which
    conftest forgets before each test, are remembered again.
    """
    private, base = _shared
    ledger_lib.remember(private.weights, private.privacy_ledger, unless={})
    return private, base


_forget_this_process = forget_remembered_values


def _steps_after_set_weights(loaded_variables):
    """dp_steps of a rebuilt private model after `set_weights` from `loaded_variables`."""
    rebuilt = dense_model(seed=7)
    rebuilt.set_weights([v.numpy() for v in loaded_variables])
    return int(tan_keras.make_private(rebuilt, **DP).dp_steps.numpy())


def _unexpected_tensors(path, weights):
    """The tensors a SavedModel holds that are neither one of `weights` nor a segments table."""
    reader = tf.train.load_checkpoint(os.path.join(path, "variables", "variables"))
    allowed = [np.asarray(w.numpy()) for w in weights]
    unexpected = []
    for key in reader.get_variable_to_shape_map():
        if key == "_CHECKPOINTABLE_OBJECT_GRAPH":
            continue
        value = np.asarray(reader.get_tensor(key))
        if any(value.shape == w.shape and np.array_equal(value, w) for w in allowed):
            continue
        is_table = (
            value.dtype == np.float64
            and value.ndim == 2
            and value.shape[1] == 1 + releases.TABLE_COLUMNS
            and "privacy_ledger" in key
        )
        if not is_table:
            unexpected.append(key)
    return unexpected


# ------------------------------------------------------------ a fresh process
_CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf

    x, expected = np.load({x!r}), np.load({expected!r})
    # Plain TensorFlow, without tan_keras: the SavedModel serves as before.
    plain = tf.saved_model.load({with_ledger!r})
    served = float(np.abs(plain.serve(x).numpy() - expected).max())
    plain_values = [v.numpy() for v in plain.variables]
    assert "tan_keras" not in sys.modules

    import tan_keras
    sys.path.insert(0, {tests!r})
    from _helpers import dense_model

    DP = {dp!r}

    def steps_after_set_weights(values):
        rebuilt = dense_model(seed=7)
        rebuilt.set_weights(values)
        return int(tan_keras.make_private(rebuilt, **DP).dp_steps.numpy())

    # Power checks first (a value remembered later would be recognised):
    # loaded before the hook existed; exported without the entry.
    unhooked = steps_after_set_weights(plain_values)
    # (Its variables' checkpoint holds the private model's ledger tables,
    # which the checkpoint-reader hook would find: turned off for this one.)
    from tan_keras.keras_dp import ledger as ledger_lib
    reader_hook = ledger_lib.after_opening_checkpoint
    ledger_lib.after_opening_checkpoint = lambda reader: None
    without = tf.saved_model.load({without_ledger!r})
    ledger_lib.after_opening_checkpoint = reader_hook
    no_entry = steps_after_set_weights([v.numpy() for v in without.variables])
    loaded = tf.saved_model.load({with_ledger!r})
    hooked = steps_after_set_weights([v.numpy() for v in loaded.variables])
    print("RESULT", json.dumps(dict(
        served=served, unhooked=unhooked, no_entry=no_entry, hooked=hooked)))
    """
)


def test_an_exported_model_brings_its_ledger_to_a_fresh_process(_trained, tmp_path, monkeypatch):
    private, _ = _trained
    x = _data()[0][:8]
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "expected.npy", private.predict(x, verbose=0))
    with_ledger, without_ledger = str(tmp_path / "with"), str(tmp_path / "without")
    private.export(with_ledger, verbose=False)
    with monkeypatch.context() as patch:  # the old export: no entry written
        patch.setattr(ledger_lib, "_add_saved_model_entry", lambda root, keras_of: None)
        private.export(without_ledger, verbose=False)
    code = _CHILD.format(
        x=str(tmp_path / "x.npy"),
        expected=str(tmp_path / "expected.npy"),
        with_ledger=with_ledger,
        without_ledger=without_ledger,
        tests=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        dp=DP,
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.split("RESULT")[-1])
    assert found["served"] < 1e-6
    assert found["hooked"] >= STEPS
    # Power checks: without the load hook, or without the entry, the count is lost.
    assert found["unhooked"] == 0
    assert found["no_entry"] == 0


# ----------------------------------------------------------------- in process
@pytest.mark.parametrize("power_check", [False, True])
@pytest.mark.parametrize("exported", ["private", "wrapped", "plain_copy", "archive"])
def test_every_export_route_carries_the_ledger(
    exported, power_check, _trained, tmp_path, monkeypatch
):
    private, base = _trained
    if power_check:
        monkeypatch.setattr(ledger_lib, "_add_saved_model_entry", lambda root, keras_of: None)
        # (The variables' checkpoint holds the ledger tables a reader would find.)
        monkeypatch.setattr(ledger_lib, "after_opening_checkpoint", lambda reader: None)
    path = str(tmp_path / "saved")
    if exported == "plain_copy":  # a plain model holding remembered private values
        copy = keras.models.clone_model(base)
        copy.set_weights(private.get_weights())
        copy.export(path, verbose=False)
    elif exported == "archive":  # the lower-level API, the wrapped model tracked
        archive = keras.export.ExportArchive()
        archive.track(base)
        archive.add_endpoint(
            "serve", base.call, [keras.InputSpec(shape=(None, 4), dtype="float32")]
        )
        archive.write_out(path, verbose=False)
    else:
        (private if exported == "private" else base).export(path, verbose=False)
    _forget_this_process()
    loaded = tf.saved_model.load(path)
    assert _steps_after_set_weights(loaded.variables) == (0 if power_check else STEPS)


@pytest.mark.parametrize("power_check", [False, True])
def test_a_frozen_tfsm_layer_of_an_export_brings_its_ledger(
    power_check, _trained, tmp_path, monkeypatch
):
    private, _ = _trained
    path = str(tmp_path / "saved")
    private.export(path, verbose=False)
    _forget_this_process()
    if power_check:  # the old load: nothing read
        monkeypatch.setattr(ledger_lib, "after_loading_saved_model", lambda root: None)
    inputs = keras.Input((4,))
    frozen = keras.layers.TFSMLayer(path, call_endpoint="serve", trainable=False)
    model = keras.Model(inputs, keras.layers.Dense(2)(frozen(inputs)))
    steps = tan_keras.make_private(model, **DP).privacy_ledger.total_steps()
    assert steps == (0 if power_check else STEPS)


def test_an_export_without_a_ledger_is_unchanged(tmp_path):
    path = str(tmp_path / "saved")
    dense_model().export(path, verbose=False)
    loaded = tf.saved_model.load(path)
    assert not hasattr(loaded, ledger_lib.SAVED_MODEL_ENTRY)
    assert _steps_after_set_weights(loaded.variables) == 0


@pytest.mark.parametrize("leak", [False, True])
def test_the_export_holds_the_weights_and_the_table_only(leak, _trained, tmp_path):
    private, base = _trained
    path = str(tmp_path / "saved")
    if leak:  # power check: the test sees a noise key an archive would write
        archive = keras.export.ExportArchive()
        archive.track_and_add_endpoint(
            "serve", private, [keras.InputSpec(shape=(None, 4), dtype="float32")]
        )
        archive.add_variable_collection("secret", [private.noise_key])
        archive.write_out(path, verbose=False)
    else:
        private.export(path, verbose=False)
    unexpected = _unexpected_tensors(path, base.weights)
    assert bool(unexpected) == leak, unexpected
    loaded = tf.saved_model.load(path)
    # The served variables are the weights alone; the table sits apart.
    assert len(loaded.variables) == len(base.weights)
    key = np.asarray(private.noise_key.numpy())
    reader = tf.train.load_checkpoint(os.path.join(path, "variables", "variables"))
    values = [np.asarray(reader.get_tensor(k)) for k in reader.get_variable_to_shape_map()]
    assert any(v.shape == key.shape and np.array_equal(v, key) for v in values) == leak


def _with_a_ledger(saved, trained):
    private, base = trained
    if saved == "private":
        return private
    if saved == "wrapped":
        return base
    copy = keras.models.clone_model(base)
    copy.set_weights(private.get_weights())
    return copy


@pytest.mark.parametrize("saved", ["private", "wrapped", "plain_copy"])
def test_tf_saved_model_save_of_a_keras_model_with_a_ledger_is_refused(saved, _trained, tmp_path):
    path = str(tmp_path / "saved")
    with pytest.raises(ValueError, match=r"tf\.saved_model\.save.*privacy ledger.*export"):
        tf.saved_model.save(_with_a_ledger(saved, _trained), path)
    assert not os.path.exists(path)


def test_tf_saved_model_save_without_the_refusal_loses_the_ledger(_trained, tmp_path, monkeypatch):
    # Power check of the refusal: the plain copy's SavedModel would hold no ledger.
    monkeypatch.setattr(ledger_lib, "before_saving_saved_model", lambda obj: None)
    path = str(tmp_path / "saved")
    tf.saved_model.save(_with_a_ledger("plain_copy", _trained), path)
    assert not hasattr(tf.saved_model.load(path), ledger_lib.SAVED_MODEL_ENTRY)


def test_tf_saved_model_save_of_a_plain_model_still_works(tmp_path):
    tf.saved_model.save(dense_model(), str(tmp_path / "saved"))
