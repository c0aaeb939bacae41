"""Escapes the second review left open (its scripts, as tests), one per family.

* Sampling: a generator that iterates the Poisson pipeline
  and re-yields its elements after blending their rows kept every identity
  field, so the step took it. Each row's identity now holds a digest of its
  content (`content_digest.py`).
* Ledger: a feature extractor cut from a private model and saved as a plain
  Keras model lost the ledger in a fresh process; a copy of the weights
  taken by a callback in the middle of an epoch was never fingerprinted;
  the fingerprints of early epochs were evicted after 8192 entries.
* Cross-example state: an augmenter given as a plain function, or a
  `Lambda` layer, that calls a `Normalization` adapted on the training set
  escaped the provenance check, which looked only at layers it was given.
"""

import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from _helpers import LOSS, dense_model, dp_model

import tan_keras
from tan_keras.keras_dp import dp_state, step_identity
from tan_keras.keras_dp import ledger as ledger_lib
from tan_keras.mechanism import captures, content_digest, data_copies, sampling
from tan_keras.privacy import releases

N, B = 64, 16
DP = dict(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=B, dataset_size=N)


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(N, 4)).astype(np.float32), rng.integers(0, 3, N).astype(np.int32)


def _pipeline():
    x, y = _data()
    return sampling.make_poisson_dataset(x, y, sampling.PoissonSampler(N, B))


def _blended(element):
    x, y, mask, step_end, identity = (np.asarray(t) for t in element)
    # Mix-up of each row with the next one: every row carries two examples.
    return (x + np.roll(x, 1, axis=0)) / 2, y, mask, step_end, identity


def _generator(pipeline, transform):
    def generate():
        for element in pipeline:
            yield transform(element)

    return generate()


def test_rows_blended_by_a_generator_after_sampling_are_refused():
    # (A PyDataset cannot yield the five-part elements: Keras refuses them.)
    model = dp_model(dense_model(), **DP)
    data = _generator(_pipeline(), _blended)
    with pytest.raises(step_identity.SamplingIdentityError, match="content of micro-batch 0"):
        model.fit(data, steps_per_epoch=4, verbose=0)
    assert int(model.dp_steps.numpy()) == 0


def test_elements_re_yielded_unchanged_train():
    model = dp_model(dense_model(), **DP)
    model.fit(
        _generator(_pipeline(), lambda e: tuple(np.asarray(t) for t in e)),
        steps_per_epoch=4,
        verbose=0,
    )
    assert int(model.dp_steps.numpy()) >= 3


def test_power_check_without_the_digest_the_blended_rows_train(monkeypatch):
    monkeypatch.setattr(
        content_digest, "matches", lambda content, identity, *nonce: tf.constant(True)
    )
    model = dp_model(dense_model(), **DP)
    model.fit(_generator(_pipeline(), _blended), steps_per_epoch=4, verbose=0)
    assert int(model.dp_steps.numpy()) >= 3


def test_the_digest_is_exact_under_xla_and_finds_a_patch():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 32, 32, 3)).astype(np.float32)
    y, mask = np.arange(6, dtype=np.int32), np.ones(6, np.float32)
    identity = content_digest._seal((x, y, mask), sampling.identity_rows(5, 1, 2, N, B, 3, 6))
    compiled = tf.function(content_digest._digest, jit_compile=True)
    np.testing.assert_array_equal(compiled((x, y, mask), identity), identity[:, -1])
    # Integers are hashed by value: a cast of the labels changes no digest.
    assert content_digest.matches((x, y.astype(np.int64), mask), identity)
    # float64 by its own bits (round 6): not the digest of the float32 values.
    assert not content_digest.matches((x.astype(np.float64), y, mask), identity)
    # A CutMix patch (a quarter of the image), one value of a small input,
    # a label and a mask are each found on their row.
    patched = x.copy()
    patched[0, 8:24, 8:24] = x[1, 8:24, 8:24]
    small = np.arange(12, dtype=np.float32).reshape(6, 2)
    small_identity = content_digest._seal((small, y, mask), identity)
    nudged = small.copy()
    nudged[2, 1] += 1e-6
    changed = [
        content_digest._digest((patched, y, mask), identity) != identity[:, -1],
        content_digest._digest((nudged, y, mask), small_identity) != small_identity[:, -1],
        content_digest._digest((x, y[::-1].copy(), mask), identity) != identity[:, -1],
        content_digest._digest((x, y, np.r_[0.0, mask[1:]]), identity) != identity[:, -1],
    ]
    np.testing.assert_array_equal(changed[0], [True, False, False, False, False, False])
    np.testing.assert_array_equal(changed[1], [False, False, True, False, False, False])
    assert np.asarray(changed[2]).all()
    np.testing.assert_array_equal(changed[3], [True, False, False, False, False, False])


def test_training_through_the_sealed_pipeline_is_unchanged_with_xla():
    model = dp_model(dense_model(), jit_compile=True, **DP)
    model.fit(_pipeline(), steps_per_epoch=3, verbose=0)
    assert int(model.dp_steps.numpy()) >= 2


# ---------------------------------------------------------------- the ledger
def _trained_private(steps=6, callbacks=()):
    private = tan_keras.make_private(dense_model(), **DP)
    private.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    x, y = _data()
    sampler = sampling.PoissonSampler(N, B, physical_batch_size=N, pad_steps=True)
    private.fit(
        sampling.make_poisson_dataset(x, y, sampler),
        steps_per_epoch=steps,
        verbose=0,
        callbacks=list(callbacks),
    )
    assert int(private.dp_steps.numpy()) == steps
    return private


def _forget_this_process(monkeypatch):
    """What a fresh process knows: no remembered weights."""
    ledger_lib._REMEMBERED.clear()


def _steps_of(model):
    ledger = ledger_lib.ledger_of(model.weights)
    return 0 if ledger is None else ledger.total_steps()


@pytest.mark.parametrize("power_check", [False, True])
@pytest.mark.parametrize("route", ["keras_file", "weights_file", "tf_checkpoint"])
def test_a_feature_extractor_saved_as_a_plain_model_brings_the_ledger(
    route, power_check, tmp_path, monkeypatch
):
    if power_check:
        monkeypatch.setattr(ledger_lib, "_restore_from_file", lambda obj, read: None)
        monkeypatch.setattr(
            ledger_lib._LedgerTensors, "_restore_from_tensors", lambda self, tensors: tf.no_op()
        )
        # (The checkpoint reader would find the ledger tables too.)
        monkeypatch.setattr(ledger_lib, "after_opening_checkpoint", lambda reader: None)
    private = _trained_private()
    # Cut below the head, as a feature extractor; saved as plain Keras.
    extractor = keras.Model(private.inputs, private.layers[-2].output)
    if route == "keras_file":
        extractor.save(tmp_path / "extractor.keras")
    elif route == "weights_file":
        extractor.save_weights(tmp_path / "extractor.weights.h5")
    else:
        checkpoint = tf.train.Checkpoint(model=extractor).write(str(tmp_path / "ckpt"))
    _forget_this_process(monkeypatch)
    if route == "keras_file":
        loaded = keras.models.load_model(tmp_path / "extractor.keras")
    else:
        loaded = keras.models.clone_model(extractor)
        if route == "weights_file":
            loaded.load_weights(tmp_path / "extractor.weights.h5")
        else:
            # Restored when the private model attaches the ledger to its layers.
            tf.train.Checkpoint(model=loaded).read(checkpoint)
    # A second phase: a new head on the loaded extractor, trained privately.
    head = keras.layers.Dense(3)(loaded.output)
    second = tan_keras.make_private(keras.Model(loaded.inputs, head), **DP)
    expected = 0 if power_check else 6
    assert second.privacy_ledger.total_steps() == expected


def test_a_plain_file_still_loads_where_tan_keras_is_not_imported(tmp_path):
    private = _trained_private(steps=2)
    keras.Model(private.inputs, private.layers[-2].output).save(tmp_path / "extractor.keras")
    script = (
        "import sys, keras; "
        f"m = keras.models.load_model({str(tmp_path / 'extractor.keras')!r}); "
        "assert 'tan_keras' not in sys.modules; print(m.output.shape)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("power_check", [False, True])
def test_weights_copied_by_a_callback_mid_epoch_are_recognised(power_check, monkeypatch):
    if power_check:
        monkeypatch.setattr(dp_state, "sees_weights_mid_epoch", lambda callback: False)
    snapshots = {}

    def keep(batch, logs=None):
        if batch == 2:
            snapshots["mid"] = snapshot_model.get_weights()

    snapshot_model = None
    private = tan_keras.make_private(dense_model(), **DP)
    private.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    snapshot_model = private
    x, y = _data()
    sampler = sampling.PoissonSampler(N, B, physical_batch_size=N, pad_steps=True)
    private.fit(
        sampling.make_poisson_dataset(x, y, sampler),
        steps_per_epoch=6,
        verbose=0,
        callbacks=[keras.callbacks.LambdaCallback(on_train_batch_end=keep)],
    )
    copy = dense_model(seed=9)
    copy.set_weights(snapshots["mid"])
    reused = tan_keras.make_private(copy, **DP)
    assert reused.privacy_ledger.total_steps() == (0 if power_check else 3)


def test_early_weights_are_recognised_after_many_others():
    private = _trained_private(steps=2)
    early = private.get_weights()
    # Many fingerprints since, from another history (more than the old cap).
    other = ledger_lib.PrivacyLedger()
    other.record_release(releases.Mechanism("gaussian", 1.0))
    variables = [tf.Variable(np.full(3, float(i), np.float32)) for i in range(9000)]
    ledger_lib.remember(variables, other, unless={})
    copy = dense_model(seed=9)
    copy.set_weights(early)
    assert tan_keras.make_private(copy, **DP).privacy_ledger.total_steps() == 2


# ----------------------------------------------------- cross-example state
def _adapted_normalization():
    norm = keras.layers.Normalization()
    norm.adapt(_data()[0])
    return norm


def _augmenter_function(norm):
    def augment(image, seed=None):
        return norm(image)

    return augment


def _lambda_model(norm):
    inputs = keras.Input((4,))
    hidden = keras.layers.Lambda(lambda t: norm(t))(inputs)
    return keras.Model(inputs, keras.layers.Dense(3)(hidden))


@pytest.mark.parametrize("power_check", [False, True])
@pytest.mark.parametrize("route", ["augmenter_function", "lambda_layer", "loss"])
def test_adapted_state_reached_through_a_function_is_refused(route, power_check, monkeypatch):
    norm = _adapted_normalization()
    if power_check:
        # The check as it was: only the layers it was given (and not the
        # traced computation's values, data_copies.py).
        monkeypatch.setattr(
            captures,
            "reachable_layers",
            lambda *roots: [r for r in roots if isinstance(r, keras.layers.Layer)],
        )
        monkeypatch.setattr(data_copies, "check_values", lambda values, where: None)
    x, y = _data()
    sampler = sampling.PoissonSampler(N, B)
    if route == "augmenter_function":
        attempt = lambda: sampling.make_poisson_dataset(  # noqa: E731
            x, y, sampler, augmult=2, augmenter=_augmenter_function(norm)
        )
        match = "augmenter"
    elif route == "lambda_layer":
        attempt = lambda: tan_keras.make_private(_lambda_model(norm), **DP)  # noqa: E731
        match = "Normalization"
    else:

        def centred_loss(y_true, y_pred):
            return LOSS(y_true, y_pred) + keras.ops.mean(norm(y_pred[:, :1] * 0 + 1.0))

        def attempt():
            private = tan_keras.make_private(dense_model(), **DP)
            private.compile(optimizer=keras.optimizers.SGD(0.1), loss=centred_loss)
            private.fit(sampling.make_poisson_dataset(x, y, sampler), steps_per_epoch=1, verbose=0)

        match = "Normalization"
    if power_check:
        attempt()
        return
    with pytest.raises(ValueError, match=match):
        attempt()


def test_a_function_reaching_a_public_or_given_normalization_passes():
    norm = _adapted_normalization()
    tan_keras.mark_public(norm, reason="statistics of a public dataset")
    given = keras.layers.Normalization(mean=0.0, variance=1.0)
    x, y = _data()
    sampler = sampling.PoissonSampler(N, B)
    sampling.make_poisson_dataset(x, y, sampler, augmenter=_augmenter_function(norm))
    tan_keras.make_private(_lambda_model(given), **DP)
