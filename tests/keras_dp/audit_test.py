"""White-box canary audit of the real DPKerasModel train step, with fault injection.

The audit (Jagielski et al. 2020; Nasr et al. 2021) runs the real `fit` of a
DPKerasModel for 2T logical steps that alternate between two neighbouring
batches: background rows plus a canary ("in" steps) and the same rows with
the canary masked out ("out" steps; the canary's data stays in the padded
row, so padding that leaked would show). The canary is always in the "in"
batch, so each step is the Gaussian mechanism with sampling rate q = 1, and
its claimed epsilon is `compute_epsilon(sigma, 1, 1, delta)`.

Model and canary, chosen so that every example's gradient is a constant
(worked out by hand):
  * one Dense layer, 16 inputs -> 2 outputs (34 parameters), zero init;
  * loss: mean absolute error over the 2 outputs; every target is 1e4, far
    above any prediction (|w| < 1, predictions < 100, with lr = 1e-3), so for x
    the loss is mean_j (1e4 - w_j.x - b_j) and its gradient is
      dL/dW[:, j] = -x / 2,   dL/db_j = -1/2   (j = 0, 1),
    whatever the weights;
  * canary x_c = 100 e_0: gradient norm sqrt(2 (100^2 + 1) / 4) = 70.7 >> C = 1,
    so it is clipped to exactly C, along the unit vector u = -g_c / |g_c|;
  * 3 background rows with small random inputs (gradient norms ~0.76 < C).
So one step's weight update is -lr (S + N(0, sigma^2 C^2 I)) / B with S the
(constant) clipped sum, and the attack score
    s = <update, u> * B / (lr C)
is N(1 + s_bg, sigma^2) in "in" steps and N(s_bg, sigma^2) in "out" steps.

The attack picks the threshold maximising the epsilon bound on the first
half of the trials and turns its TPR/FPR on the second half into a Clopper-
Pearson epsilon lower bound at 95% confidence (`tan_keras.analysis.auditing`).

Detectors (a correct implementation must pass all three; every injected
fault must trip at least one -- the power check of the audit):
  * audit: epsilon lower bound > the accountant's epsilon;
  * noise std: per-coordinate update std (after removing each world's
    constant mean; T x 34 x 2 draws, relative standard error 0.2%) off
    sigma*C*lr/B by more than 3%;
  * noise reuse: lag-1 correlation of consecutive steps' noise above
    5 standard errors.
Noise shared across replicas (same seed on every replica) is tested in
tests/keras_dp/distributed_test.py (test_power_check_same_seed_replicas_are_correlated
and the std tests), not here.
"""

import functools
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from _helpers import identities, sealed

from tan_keras.analysis import auditing
from tan_keras.keras_dp import dp_model
from tan_keras.mechanism import clipping, ghost, noise
from tan_keras.privacy import accounting

SIGMA = 1.5  # one step at q = 1: epsilon 2.75 (PLD, exact here) / 2.98 (RDP)
CLIP = 1.0
BATCH = 4  # expected batch size B: canary + 3 background rows; N = 4, q = 1
LR = 1e-3
DELTA = 1e-5
TRIALS = 2000  # per world: 1000 to choose the threshold, 1000 to evaluate it
# The power checks run 8 times fewer trials: a detector that fires with fewer
# trials fires with more (the Clopper-Pearson bound and the std estimate only
# sharpen), and at 250 trials the std's relative standard error (0.54%) is
# still far inside the 3% tolerance, so a correct step would not fire it.
POWER_CHECK_TRIALS = 250
INPUTS, OUTPUTS, ROWS = 16, 2, 8  # 8 physical rows: 4 real + 4 padding
TARGET = 1e4
NOISE_SEED = 20230101
STD_REL_TOL = 0.03
CORRELATION_SE = 5.0


def _canary_direction():
    """Unit vector u = -g_c / |g_c| over (kernel [16, 2], bias [2]), flattened."""
    kernel = np.zeros((INPUTS, OUTPUTS), np.float64)
    kernel[0, :] = 100.0 / 2  # -dL/dW[:, j] = x_c / 2 with x_c = 100 e_0
    bias = np.full(OUTPUTS, 0.5)  # -dL/db_j = 1/2
    u = np.concatenate([kernel.ravel(), bias])
    return u / np.linalg.norm(u)


def _batches(steps, model):
    """(x, y, mask, step_end, identity) for `steps` one-micro-batch logical steps of `model`.

    Even steps hold the canary (row 0), odd steps mask it out.
    """
    rng = np.random.default_rng(0)
    x = np.zeros((ROWS, INPUTS), np.float32)
    x[0, 0] = 100.0
    x[1:4] = 0.1 * rng.normal(size=(3, INPUTS))
    mask = np.r_[np.ones(4), np.zeros(ROWS - 4)].astype(np.float32)
    masks = np.repeat(mask[None], steps, axis=0)
    masks[1::2, 0] = 0.0
    return sealed(
        tf.data.Dataset.from_tensor_slices(
            (
                np.repeat(x[None], steps, axis=0),
                np.full((steps, ROWS, OUTPUTS), TARGET, np.float32),
                masks,
                np.ones((steps, ROWS), bool),
                identities(model, np.ones(steps, bool), rows=ROWS),
            )
        )
    )


class _RecordWeights(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.weights = []

    def on_train_batch_end(self, batch, logs=None):
        self.weights.append(
            np.concatenate([v.numpy().ravel() for v in self.model.trainable_variables])
        )


def _run(trials=TRIALS, sigma=SIGMA, clipping_mode="auto"):
    """Runs 2 * trials real DP steps; returns updates [2 * trials, 34] (in, out, in, ...)."""
    inp = keras.Input((INPUTS,))
    out = keras.layers.Dense(OUTPUTS, kernel_initializer="zeros")(inp)
    with warnings.catch_warnings():
        # The fixed noise seed makes the test deterministic (and the run not private).
        warnings.simplefilter("ignore", noise.NotPrivateWarning)
        model = dp_model.DPKerasModel(
            inp,
            out,
            l2_norm_clip=CLIP,
            noise_multiplier=sigma,
            expected_batch_size=BATCH,
            dataset_size=BATCH,
            noise_seed=NOISE_SEED,
            clipping=clipping_mode,
        )
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mean_absolute_error")
    start = np.concatenate([v.numpy().ravel() for v in model.trainable_variables])
    recorder = _RecordWeights()
    model.fit(_batches(2 * trials, model), epochs=1, verbose=0, callbacks=[recorder])
    assert int(model.dp_steps.numpy()) == 2 * trials
    weights = np.vstack([start[None]] + recorder.weights).astype(np.float64)
    return np.diff(weights, axis=0)


def _analyse(updates, sigma=SIGMA):
    """The three detectors' statistics for one run (see the module docstring)."""
    scores = updates @ _canary_direction() * BATCH / (LR * CLIP)
    scores_in, scores_out = scores[0::2], scores[1::2]
    half = len(scores_in) // 2
    threshold, _ = auditing.best_threshold(scores_in[:half], scores_out[:half], DELTA)
    tp = auditing.count_at_or_above(scores_in[half:], threshold)
    fp = auditing.count_at_or_above(scores_out[half:], threshold)
    n_in, n_out = len(scores_in) - half, len(scores_out) - half
    eps_lower = auditing.epsilon_lower_bound(tp, n_in, fp, n_out, DELTA)

    # Each world's update is a constant plus noise: remove the constant.
    residuals = updates.copy()
    residuals[0::2] -= residuals[0::2].mean(axis=0)
    residuals[1::2] -= residuals[1::2].mean(axis=0)
    expected_std = sigma * CLIP * LR / BATCH
    std_ratio = residuals.std() / expected_std
    a, b = residuals[:-1].ravel(), residuals[1:].ravel()
    norm = np.sqrt((a @ a) * (b @ b))
    lag1 = (a @ b) / norm if norm > 0 else float("nan")
    return dict(
        tpr=tp / n_in,
        fpr=fp / n_out,
        threshold=threshold,
        eps_lower=eps_lower,
        eps_claimed=accounting.compute_epsilon(sigma, 1.0, 1, DELTA, accountant="pld"),
        eps_claimed_rdp=accounting.compute_epsilon(sigma, 1.0, 1, DELTA),
        std_ratio=std_ratio,
        lag1=lag1,
        lag1_bound=CORRELATION_SE / np.sqrt(a.size),
    )


def _detections(stats):
    """Names of the detectors that fire."""
    fired = []
    if stats["eps_lower"] > stats["eps_claimed"]:
        fired.append("audit")
    if not abs(stats["std_ratio"] - 1) <= STD_REL_TOL:  # NaN fires too
        fired.append("noise_std")
    if not abs(stats["lag1"]) <= stats["lag1_bound"]:
        fired.append("noise_reuse")
    return fired


def _report(name, stats):
    # Printed for `pytest -s`: the numbers quoted in the README.
    print(
        f"\n[audit] {name}: TPR={stats['tpr']:.3f} FPR={stats['fpr']:.3f} "
        f"eps_lower={stats['eps_lower']:.2f} claimed={stats['eps_claimed']:.2f} "
        f"(rdp {stats['eps_claimed_rdp']:.2f}) std_ratio={stats['std_ratio']:.4f} "
        f"lag1={stats['lag1']:.4f} (bound {stats['lag1_bound']:.4f}) "
        f"fired={_detections(stats)}"
    )


# Every way of computing per-example gradients is audited ("auto" picks
# "ghost" for this Dense model: its kernel is clipped by ghost norm); the faults
# are injected into the default.
MODES = ("ghost", "layerwise", "vectorized")


@functools.cache
def _correct_stats(mode):
    return _analyse(_run(clipping_mode=mode))


@pytest.mark.parametrize("mode", MODES)
def test_canary_is_clipped_to_exactly_c_along_the_known_direction(mode):
    # Without noise the score is exactly 1 + s_bg in, s_bg out: the canary
    # moves the update by lr*C/B along u, as the attack assumes.
    updates = _run(trials=2, sigma=0.0, clipping_mode=mode)
    scores = updates @ _canary_direction() * BATCH / (LR * CLIP)
    np.testing.assert_allclose(scores[0::2] - scores[1::2], 1.0, rtol=1e-3)
    np.testing.assert_allclose(np.diff(scores[1::2]), 0.0, atol=1e-3)


@pytest.mark.parametrize("mode", MODES)
def test_audit_lower_bound_stays_below_the_claimed_epsilon(mode):
    stats = _correct_stats(mode)
    _report(f"correct ({mode})", stats)
    assert stats["eps_lower"] <= stats["eps_claimed"] <= stats["eps_claimed_rdp"]
    # The attack works (a useless attack would also "pass"): TPR well above FPR.
    assert stats["tpr"] > stats["fpr"] + 0.05, stats
    assert _detections(stats) == [], stats


@pytest.mark.parametrize("mode", MODES)
def test_measured_noise_std_is_sigma_c_over_b(mode):
    stats = _correct_stats(mode)
    assert abs(stats["std_ratio"] - 1) <= STD_REL_TOL, stats["std_ratio"]


@pytest.mark.parametrize("mode", MODES)
def test_consecutive_steps_draw_independent_noise(mode):
    stats = _correct_stats(mode)
    assert abs(stats["lag1"]) <= stats["lag1_bound"], stats


def _patch(monkeypatch, module, name, make_replacement):
    """Replaces `module.name` where dp_model looks it up; checks it gets used.

    dp_model may call `module.name` or have imported the name itself; both are
    patched. The replacement records its use when the train step is traced, so
    a patch that silently missed cannot pass for a fault that went undetected.
    """
    original = getattr(module, name)
    used = []

    def replacement(*args, **kwargs):
        used.append(True)
        return make_replacement(original)(*args, **kwargs)

    monkeypatch.setattr(module, name, replacement)
    if getattr(dp_model, name, None) is original:
        monkeypatch.setattr(dp_model, name, replacement)
    return used


def _scale_noise(factor):
    return lambda mp: _patch(
        mp,
        noise,
        "add_gaussian_noise",
        lambda original: lambda g, std, seed: original(g, std * factor, seed),
    )


def _clipping_off(monkeypatch):
    return _patch(
        monkeypatch,
        clipping,
        "clip_and_sum",
        lambda original: lambda g, c, mask: original(g, 1e9, mask),
    )


def _unclipped_gradient_added(monkeypatch):
    # E.g. the ordinary batch gradient summed into the update next to the
    # clipped one.
    def make(original):
        def leaky(grads, c, mask):
            result = original(grads, c, mask)
            real = tf.cast(mask > 0, tf.float32)
            raw = [
                # A ghost kernel's unclipped sum: every example weighted by 1.
                g.clipped_sum(mask > 0, tf.ones_like(real), 1.0)
                if isinstance(g, ghost.GhostGradient)
                else tf.tensordot(real, tf.cast(g, tf.float32), axes=1)
                for g in grads
            ]
            return result._replace(grad_sum=[s + r for s, r in zip(result.grad_sum, raw)])

        return leaky

    return _patch(monkeypatch, clipping, "clip_and_sum", make)


def _seed_ignoring_step(step_of):
    return lambda mp: _patch(
        mp,
        noise,
        "step_seed",
        lambda original: lambda key, step, replica_id=0: original(key, step_of(step), replica_id),
    )


FAULTS = {
    "clipping_off": _clipping_off,
    "noise_x1e-3": _scale_noise(1e-3),
    "noise_halved": _scale_noise(1 / np.sqrt(4)),
    "noise_reused_every_step": _seed_ignoring_step(lambda step: 0),
    "noise_reused_by_pairs_of_steps": _seed_ignoring_step(lambda step: step // 2),
    "unclipped_gradient_added": _unclipped_gradient_added,
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_power_check_audit_catches_injected_fault(fault, monkeypatch):
    used = FAULTS[fault](monkeypatch)
    stats = _analyse(_run(trials=POWER_CHECK_TRIALS))
    assert used, f"the {fault} patch was never called by the train step"
    _report(fault, stats)
    assert _detections(stats), stats
