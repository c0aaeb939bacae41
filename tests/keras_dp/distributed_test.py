"""DP training under MirroredStrategy with 1 and 2 replicas (CPU devices).

Each configuration runs in a subprocess (`_distributed_worker.py`), since the
number of logical devices is fixed when TensorFlow starts.
"""

import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from _helpers import per_step_values, released_fraction_ok

from tan_keras.privacy import accounting

WORKER = os.path.join(os.path.dirname(os.path.dirname(__file__)), "_distributed_worker.py")


@functools.cache
def _run(replicas, variant="correct"):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(
        [sys.executable, WORKER, str(replicas), variant],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def _std_ok(result, rel_tol=0.03):
    """Update std within 3% of sigma*C/B_global (~9e4 draws: 0.24% std error)."""
    return abs(result["noise_std"] / result["expected_std"] - 1) < rel_tol


@pytest.mark.parametrize("replicas", [2])
def test_weights_equal_the_single_device_run_without_noise(replicas):
    single, multi = _run(1), _run(replicas)
    for a, b in zip(single["weights"], multi["weights"]):
        np.testing.assert_allclose(np.array(b), np.array(a), atol=1e-5)


@pytest.mark.parametrize("replicas", [1, 2])
def test_adam_equals_the_run_without_a_strategy(replicas):
    # The gated update puts Adam's state back on micro-batches that end no
    # logical step: 3 updates, not 6, and the same weights as the one-device
    # path (no strategy, no gating).
    multi, reference = _run(replicas), _run(1, "adam_no_strategy")
    assert multi["adam_iterations"] == reference["adam_iterations"] == 3
    for a, b in zip(reference["weights_adam"], multi["weights_adam"]):
        np.testing.assert_allclose(np.array(b), np.array(a), atol=1e-5)
    moved = max(
        float(np.abs(np.array(a) - np.array(b)).max())
        for a, b in zip(reference["weights_adam"], _run(1)["weights"])
    )
    assert moved > 1e-4  # Adam's update differs from SGD's: the comparison means something


@pytest.mark.parametrize("replicas", [1, 2])
def test_optimizer_clipping_is_refused_with_several_replicas(replicas):
    # Keras clips each replica's partial (noisy) gradient before the
    # all-reduce: with R > 1 that is not post-processing of the noisy sum.
    # On one replica the optimizer sees the whole noisy gradient: accepted.
    result = _run(replicas)
    assert result["optimizer_clipping_refused"] == (replicas > 1)
    # Set after compile, the option is caught by fit before any step.
    assert result["late_clipnorm_refused"] == (replicas > 1)
    if replicas > 1:
        assert result["late_clipnorm_untouched"]


@pytest.mark.parametrize("replicas", [1, 2])
def test_chunked_clipping_per_replica_equals_the_single_device_run(replicas):
    single, multi = _run(1), _run(replicas)
    for a, b in zip(single["weights"], multi["weights_chunked"]):
        np.testing.assert_allclose(np.array(b), np.array(a), atol=1e-5)
    assert multi["chunked_moved"] > 1e-3  # the steps moved the weights: equality means something


@pytest.mark.parametrize("replicas", [1, 2])
def test_noise_std_is_sigma_c_over_global_batch(replicas):
    result = _run(replicas)
    assert _std_ok(result), result["noise_std"] / result["expected_std"]


@pytest.mark.parametrize("replicas,variant", [(2, "same_seed"), (2, "full_noise")])
def test_power_check_broken_replica_noise_fails_the_std_test(replicas, variant):
    result = _run(replicas, variant)
    assert not _std_ok(result), result["noise_std"] / result["expected_std"]


@pytest.mark.parametrize("replicas", [2])
def test_per_replica_noise_is_uncorrelated(replicas):
    draws = np.array(_run(replicas)["replica_noise"])
    corr = np.corrcoef(draws)
    bound = 5 / np.sqrt(draws.shape[1])
    assert np.all(np.abs(corr[~np.eye(replicas, dtype=bool)]) < bound)


def test_power_check_same_seed_replicas_are_correlated():
    draws = np.array(_run(2, "same_seed")["replica_noise"])
    assert np.corrcoef(draws)[0, 1] > 0.99


def test_step_count_and_epsilon_do_not_depend_on_replicas():
    steps = {r: _run(r)["dp_steps"] for r in (1, 2)}
    assert steps == {1: 3, 2: 3}
    assert all(_run(r)["dp_steps_after_set_weights"] == 3 for r in (1, 2))
    eps = {r: accounting.compute_epsilon(1.0, 8 / 64, s, 1e-5) for r, s in steps.items()}
    assert len(set(eps.values())) == 1


@pytest.mark.parametrize("replicas", [1, 2])
def test_weight_penalty_gradient_is_applied_once(replicas):
    result = _run(replicas)
    assert result["reg_update"] == pytest.approx(result["reg_expected"], rel=1e-5)


def test_power_check_penalty_added_on_every_replica_is_caught():
    result = _run(2, "reg_every_replica")
    assert result["reg_update"] == pytest.approx(2 * result["reg_expected"], rel=1e-5)


@pytest.mark.parametrize("replicas", [1, 2])
def test_invalid_labels_and_model_checks_hold_under_the_strategy(replicas):
    result = _run(replicas)
    assert result["invalid_labels_counted"] == 2
    assert result["state_write_refused"]
    assert not result["tied_kernel_ghosted"]


@pytest.mark.parametrize("replicas", [2])
def test_several_inputs_and_outputs_train_alike_on_any_number_of_replicas(replicas):
    single, many = _run(1), _run(replicas)
    assert single["structured_steps"] == many["structured_steps"] >= 1
    for a, b in zip(single["structured_weights"], many["structured_weights"]):
        np.testing.assert_allclose(np.array(b), np.array(a), atol=1e-5)


def test_noisy_clipped_fraction_is_released_once_over_all_replicas():
    # Each replica noises its partial count with std s*B/sqrt(R); the logged
    # fraction is the sum over replicas, plus noise of std s*B, over B.
    result = _run(2)
    values = per_step_values(result["fraction_running_means"])
    truth = np.array(result["fraction_truth"])
    assert released_fraction_ok(values, truth, 0.1)
    assert result["fraction_epoch_log"] == pytest.approx(values.mean(), abs=1e-4)
    # Power check: a log averaged over replicas (1/R of the count) fails the test.
    assert not released_fraction_ok(values / 2, truth, 0.1)
    # release_train_metrics=False under the strategy: nothing noiseless.
    assert result["fraction_log_keys"] == ["noisy_clipped_fraction", "val_accuracy", "val_loss"]
