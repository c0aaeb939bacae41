"""Arrays read from a Keras weight file by Keras's own file reader keep the file's ledger.

Review 6 escape (ESCAPE1): in a fresh process, a private model's
`.weights.h5` read with `keras.saving.KerasFileEditor(path).weights_dict`,
the arrays set into a rebuilt model (`set_weights`) and made private,
started the ledger at 0 (epsilon 4.871 reported for 12 updates' 7.330).
The editor now gives the file it reads to the ledger
(`ledger.after_reading_weight_file`), which remembers its arrays with the
entries written beside them, as `load_weights` does: the model's entry
(a private model's file) and each layer's (a plain copy's file), in a
`.weights.h5` or a `.keras` file.

Each case writes the file, forgets what this process remembers (what a
fresh process knows), reads the arrays back into a rebuilt model and makes
it private: it must count the updates they went through. Power checks:
without the hook, or from the same file with its ledger entries deleted,
it counts 0. Arrays read with `h5py` by hand stay out of reach (a
documented limitation, like pickled `get_weights`).
"""

import json
import os
import subprocess
import sys
import textwrap

import h5py
import keras
import numpy as np
import pytest
from _helpers import dense_model, forget_remembered_values, trained_dense_private

import tan_keras
from tan_keras import _fingerprints
from tan_keras.keras_dp import ledger as ledger_lib
from tan_keras.privacy import releases

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


def _counted(values):
    """dp_steps of a rebuilt model made private after `set_weights(values)`."""
    rebuilt = dense_model(seed=7)
    rebuilt.set_weights([np.asarray(v) for v in values])
    return int(tan_keras.make_private(rebuilt, **DP).dp_steps.numpy())


def _editor_arrays(path):
    """[kernel, bias, kernel, bias] of the dense model, read with `KerasFileEditor`."""
    layers = keras.saving.KerasFileEditor(path).weights_dict["layers"]
    return [layers[name][k] for name in ("dense", "dense_1") for k in ("0", "1")]


def _write(written, private, base, directory):
    """The file `written` names, of the private model or of a plain copy of its weights."""
    if written == "plain_copy":
        # A plain clone: no model entry, only the layers' (`_write_to_file`).
        clone = keras.models.clone_model(base)
        clone.set_weights(private.get_weights()[: len(clone.weights)])
        path = os.path.join(directory, "copy.weights.h5")
        clone.save_weights(path)
        return path
    if written == "keras":
        path = os.path.join(directory, "private.keras")
        private.save(path)
        return path
    path = os.path.join(directory, "private.weights.h5")
    private.save_weights(path)
    return path


@pytest.mark.parametrize("power_check", [False, True])
@pytest.mark.parametrize("written", ["weights_h5", "keras", "plain_copy"])
def test_arrays_read_with_the_file_editor_keep_the_ledger(
    written, power_check, _trained, tmp_path, monkeypatch
):
    private, base = _trained
    path = _write(written, private, base, str(tmp_path))
    if power_check:  # the editor's hook does nothing: the old behaviour
        monkeypatch.setattr(ledger_lib, "after_reading_weight_file", lambda group, tree: None)
    forget_remembered_values()
    assert _counted(_editor_arrays(path)) == (0 if power_check else STEPS)


@pytest.mark.parametrize("written", ["weights_h5", "plain_copy"])
def test_power_check_the_same_arrays_without_the_files_entries_count_zero(
    written, _trained, tmp_path
):
    private, base = _trained
    path = _write(written, private, base, str(tmp_path))
    editor = keras.saving.KerasFileEditor(path)
    # The entries at the places they were written: the model's (in the tree)
    # and each layer's (beside its "vars" group: not in the tree).
    editor.weights_dict.pop(ledger_lib._ATTRIBUTE, None)
    stripped = str(tmp_path / "stripped.weights.h5")
    editor.save(stripped)
    forget_remembered_values()
    # The editor's save writes the tree only: no layer entry survives.
    with h5py.File(stripped, "r") as f:
        names = []
        f.visit(names.append)
    assert not [n for n in names if ledger_lib._ATTRIBUTE in n]
    assert _counted(_editor_arrays(stripped)) == 0
    # The values themselves are those of the original file, which counts them.
    assert _counted(_editor_arrays(path)) == STEPS


def test_keras_saving_load_weights_into_a_plain_model_keeps_the_ledger(_trained, tmp_path):
    private, base = _trained
    path = _write("weights_h5", private, base, str(tmp_path))
    forget_remembered_values()
    plain = dense_model(seed=3)
    keras.saving.load_weights(plain, path)
    assert _counted(plain.get_weights()) == STEPS


def test_the_entries_cover_the_objects_they_were_written_beside():
    """A layer's entry covers its arrays only; the model's, every layer's."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 2)), rng.normal(size=(4,))
    segments = {7: {releases.Mechanism("poisson", 1.0, N, B): (5, 1)}}
    tree = {"layers": {"dense": {"0": a}, "other": {"0": b}}}
    ledger_lib._remember_file_values(tree, {("layers", "dense"): segments})
    known = ledger_lib._REMEMBERED
    assert _fingerprints.value_fingerprint(a) in known
    assert _fingerprints.value_fingerprint(a.T) in known
    assert _fingerprints.value_fingerprint(b) not in known
    ledger_lib._remember_file_values(tree, {(): segments})
    assert _fingerprints.value_fingerprint(b) in known
    # Constant arrays (a zero bias) are not remembered: other models hold them too.
    ledger_lib._remember_file_values({"0": np.zeros(5)}, {(): segments})
    assert _fingerprints.value_fingerprint(np.zeros(5)) not in known


# ------------------------------------------------------- the reviewer's route
_CHILD = textwrap.dedent(
    """
    import json, os, sys, warnings
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    warnings.filterwarnings("ignore")
    import numpy as np, keras, tan_keras
    from tan_keras.keras_dp import ledger
    from tan_keras.privacy import accounting
    N, B, path = {n}, {b}, {path!r}
    rng = np.random.default_rng(0)
    X = rng.normal(size=(N, 6)).astype("float32")
    Y = rng.integers(0, 3, size=(N,)).astype("int32")

    def build():
        keras.utils.set_random_seed(1)
        i = keras.Input((6,))
        h = keras.layers.Dense(8, activation="relu")(i)
        return keras.Model(i, keras.layers.Dense(3)(h))

    def private(m):
        p = tan_keras.make_private(m, l2_norm_clip=1.0, noise_multiplier=1.0,
                                   expected_batch_size=B, dataset_size=N)
        p.compile(optimizer=keras.optimizers.SGD(0.5),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return p

    def read():
        wd = keras.saving.KerasFileEditor(path).weights_dict["layers"]
        m = build()
        m.set_weights([wd[l][k] for l in ("dense", "dense_1") for k in ("0", "1")])
        return m

    # Power check first: without the hook, the arrays count from 0.
    hook = ledger.after_reading_weight_file
    ledger.after_reading_weight_file = lambda group, tree: None
    unhooked = int(private(read()).dp_steps.numpy())
    ledger.after_reading_weight_file = hook
    p = private(read())
    before = int(p.dp_steps.numpy())
    p.fit(X, Y, batch_size=B, epochs=1, verbose=0)
    acc = tan_keras.PrivacyAccountant(delta=1e-5)
    acc.set_model(p)
    print("RESULT" + json.dumps(dict(
        unhooked=unhooked, before=before, after=int(p.dp_steps.numpy()),
        epsilon=acc.epsilon(), twelve=accounting.compute_epsilon(1.0, B / N, 12, 1e-5))))
    """
)


def test_the_reviewers_route_counts_the_files_updates_in_a_fresh_process(tmp_path):
    """ESCAPE1: 8 updates written, read with the editor in a fresh process, 4 more: 12."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 6)).astype("float32")
    y = rng.integers(0, 3, size=(N,)).astype("int32")
    keras.utils.set_random_seed(1)
    i = keras.Input((6,))
    h = keras.layers.Dense(8, activation="relu")(i)
    p = tan_keras.make_private(
        keras.Model(i, keras.layers.Dense(3)(h)),
        l2_norm_clip=1.0,
        noise_multiplier=1.0,
        expected_batch_size=B,
        dataset_size=N,
    )
    p.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    p.fit(x, y, batch_size=B, epochs=2, verbose=0)
    assert int(p.dp_steps.numpy()) == 8
    path = str(tmp_path / "w.weights.h5")
    p.save_weights(path)
    result = subprocess.run(
        [sys.executable, "-c", _CHILD.format(n=N, b=B, path=path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.split("RESULT")[-1])
    assert found["unhooked"] == 0  # power check: the escape as the reviewer measured it
    assert (found["before"], found["after"]) == (8, 12)
    assert found["epsilon"] == pytest.approx(found["twelve"], rel=1e-9)
    assert found["epsilon"] == pytest.approx(7.330, abs=5e-4)
