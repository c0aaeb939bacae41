"""Weights a generator copies mid-fit keep the history they had (review round 8, escape 18).

A generator feeding `fit` runs between updates: it can take a snapshot of
the private weights after a few of them (`get_weights()`), which a model
made private later would hold. The model remembers every update's values
when its input is a generator, as it does when a callback has a batch hook.
Power check: remembered only at the epoch's end, the snapshot counts 0.
"""

import time

import numpy as np
import pytest
import tensorflow as tf
from _helpers import dense_model, dp_model

import tan_keras
from tan_keras.keras_dp import fit_inputs
from tan_keras.mechanism import sampling

N, B = 40, 10  # an (N, B) no other test file uses
DP = dict(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=B, dataset_size=N)
STEPS = 5


@pytest.mark.parametrize("power_check", [False, True])
def test_a_snapshot_taken_by_the_generator_mid_fit_keeps_its_history(power_check, monkeypatch):
    if power_check:
        monkeypatch.setattr(fit_inputs, "runs_code_between_updates", lambda data: False)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 4)).astype(np.float32)
    y = rng.integers(0, 3, N).astype(np.int32)
    sampler = sampling.PoissonSampler(N, B, physical_batch_size=N, pad_steps=True)
    pipeline = sampling.make_poisson_dataset(x, y, sampler)
    model = dp_model(dense_model(), **DP)
    snapshots = []

    def generate():
        for i, element in enumerate(pipeline.take(STEPS).as_numpy_iterator()):
            # Element i is needed once update i - 1 is done: waiting for it
            # makes the snapshot one of update 1 or 2, never the last one.
            while i == 3 and int(model.dp_steps.numpy()) < 2:
                time.sleep(0.01)
            if i == 3:
                snapshots.append(model.get_weights())
            yield element

    model.fit(generate(), verbose=0)
    assert int(model.dp_steps.numpy()) == STEPS
    (snapshot,) = snapshots
    assert not all(np.array_equal(a, b) for a, b in zip(snapshot, model.get_weights()))
    rebuilt = dense_model(seed=3)
    rebuilt.set_weights(snapshot[: len(rebuilt.weights)])
    counted = int(tan_keras.make_private(rebuilt, **DP).dp_steps.numpy())
    if power_check:
        assert counted == 0
    else:
        assert 2 <= counted < STEPS


def test_what_runs_code_between_updates():
    assert fit_inputs.runs_code_between_updates(iter([1]))
    assert not fit_inputs.runs_code_between_updates(tf.data.Dataset.range(3))
    assert not fit_inputs.runs_code_between_updates(np.zeros(3))
    assert not fit_inputs.runs_code_between_updates({"a": np.zeros(3)})
