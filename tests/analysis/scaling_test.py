"""Scaling law fit, prediction intervals, ranking and the compute ledger."""

import math

import numpy as np
import pytest
from scipy import stats

from tan_keras.analysis import scaling

# A law like the paper's ImageNet one: 2 points lost per doubling of B.
A, B_SLOPE, NOISE = 0.60, 0.02, 0.005
SIM_BATCHES = (64, 128, 256, 512)
REF_BATCH = 4096


def _synthetic(rng, batches=SIM_BATCHES, seeds=3, a=A, b=B_SLOPE, noise=NOISE):
    xs = np.repeat(np.asarray(batches, float), seeds)
    ys = a - b * np.log2(xs) + rng.normal(0.0, noise, len(xs))
    return xs, ys


@pytest.mark.parametrize("dof", [1, 2, 3, 4, 7, 10, 31, 200])
@pytest.mark.parametrize("confidence", [0.5, 0.9, 0.95, 0.99])
def test_student_t_critical_matches_scipy(dof, confidence):
    expected = stats.t.ppf(0.5 + confidence / 2, dof)
    assert scaling.student_t_critical(confidence, dof) == pytest.approx(expected, rel=1e-9)


def test_fit_matches_scipy_linregress():
    xs, ys = _synthetic(np.random.default_rng(0))
    fit = scaling.fit_log_linear(xs, ys)
    ref = stats.linregress(np.log2(xs), ys)
    assert fit.slope == pytest.approx(-ref.slope, rel=1e-10)
    assert fit.intercept == pytest.approx(ref.intercept, rel=1e-10)
    assert fit.slope_stderr == pytest.approx(ref.stderr, rel=1e-10)
    assert fit.intercept_stderr == pytest.approx(ref.intercept_stderr, rel=1e-10)
    assert fit.dof == len(xs) - 2
    assert fit.batch_sizes == SIM_BATCHES


def test_fit_recovers_known_law_and_noiseless_data_exactly():
    fit = scaling.fit_log_linear(*_synthetic(np.random.default_rng(1)))
    # Tolerances: 4 standard errors of each estimate.
    assert abs(fit.slope - B_SLOPE) < 4 * fit.slope_stderr
    assert abs(fit.intercept - A) < 4 * fit.intercept_stderr
    assert fit.residual_std == pytest.approx(NOISE, rel=0.5)
    exact = scaling.fit_log_linear([2, 4, 8], [0.9, 0.8, 0.7])
    assert exact.slope == pytest.approx(0.1) and exact.intercept == pytest.approx(1.0)
    assert exact.residual_std == pytest.approx(0.0, abs=1e-12)


def test_prediction_at_reference_batch():
    fit = scaling.fit_log_linear(*_synthetic(np.random.default_rng(2)))
    pred = fit.predict(REF_BATCH)
    truth = A - B_SLOPE * math.log2(REF_BATCH)
    assert pred.extrapolated and not fit.predict(128).extrapolated
    assert pred.lower < truth < pred.upper
    assert pred.accuracy == pytest.approx(fit.intercept - fit.slope * 12)
    # Averaging more runs narrows the interval; extrapolating further widens it.
    wide, narrow = pred.upper - pred.lower, fit.predict(REF_BATCH, num_runs=5)
    assert narrow.upper - narrow.lower < wide
    far = fit.predict(8 * REF_BATCH)
    assert far.upper - far.lower > wide
    assert pred.to_dict()["batch_size"] == REF_BATCH


def test_intervals_have_their_nominal_coverage():
    # 400 synthetic searches; each 95% interval should cover the truth ~95% of
    # the time. Binomial(400, 0.95) has std ~4.4 runs: accept 0.92..0.98.
    rng = np.random.default_rng(3)
    truth = A - B_SLOPE * math.log2(REF_BATCH)
    slope_hits = pred_hits = 0
    trials = 400
    for _ in range(trials):
        fit = scaling.fit_log_linear(*_synthetic(rng, seeds=2))
        low, high = fit.slope_interval(0.95)
        slope_hits += low <= B_SLOPE <= high
        new_run = truth + rng.normal(0.0, NOISE)
        pred_hits += fit.predict(REF_BATCH).covers(new_run)
    assert 0.92 <= slope_hits / trials <= 0.98
    assert 0.92 <= pred_hits / trials <= 0.98


def test_power_a_wrong_slope_is_rejected():
    # Alternatives a few interval half-widths away must be rejected most of
    # the time (measured rates over 200 trials in brackets):
    # * a slope 0.006 off the truth, ~2 half-widths of the slope interval
    #   (0.99);
    # * a reference run whose law steepens by 1 point per doubling beyond the
    #   largest simulated batch (512 -> 4096: 3 points, ~1.7 half-widths of
    #   the prediction interval) (0.94).
    rng = np.random.default_rng(4)
    rejected_slope = rejected_ref = 0
    trials = 50
    for _ in range(trials):
        fit = scaling.fit_log_linear(*_synthetic(rng))
        low, high = fit.slope_interval(0.95)
        rejected_slope += not low <= B_SLOPE + 0.006 <= high
        truth = A - B_SLOPE * math.log2(REF_BATCH)
        steeper = truth - 0.01 * (math.log2(REF_BATCH) - math.log2(SIM_BATCHES[-1]))
        rejected_ref += not fit.predict(REF_BATCH).covers(steeper + rng.normal(0.0, NOISE))
    assert rejected_slope >= 0.9 * trials
    assert rejected_ref >= 0.8 * trials


@pytest.mark.parametrize(
    "batches, accs, name, pattern",
    [
        ([256, 256, 256], [0.5, 0.6, 0.7], "batch_sizes", "at least 2 distinct batch sizes"),
        ([128, 256], [0.5, 0.6], "batch_sizes", "at least 3 runs"),
        ([128, 256, 512], [0.5, 0.6], "accuracies", "one accuracy per batch size"),
        ([128, 0, 512], [0.5, 0.6, 0.7], "batch_sizes", "a finite float > 0"),
        ([128, 256, 512], [0.5, math.nan, 0.7], "accuracies", "a finite float"),
        (256, [0.5], "batch_sizes", "a sequence of finite floats"),
    ],
)
def test_fit_rejects_bad_input(batches, accs, name, pattern):
    with pytest.raises(ValueError, match=rf"Invalid value for `{name}`: expected {pattern}"):
        scaling.fit_log_linear(batches, accs)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda f: f.predict(0), "batch_size"),
        (lambda f: f.predict(256, confidence=1.0), "confidence"),
        (lambda f: f.predict(256, num_runs=0), "num_runs"),
        (lambda f: f.slope_interval(0.0), "confidence"),
        (lambda f: scaling.student_t_critical(0.95, 0), "dof"),
    ],
)
def test_prediction_rejects_bad_input(call, name):
    fit = scaling.fit_log_linear([2, 4, 8], [0.9, 0.8, 0.71])
    with pytest.raises(ValueError, match=f"Invalid value for `{name}`"):
        call(fit)


def test_rank_configs_orders_by_mean_with_std():
    results = [("lr=1", 0.80), ("lr=2", 0.90), ("lr=1", 0.84), ("lr=2", 0.86), ("lr=4", 0.5)]
    ranking = scaling.rank_configs(results)
    assert [r.config for r in ranking] == ["lr=2", "lr=1", "lr=4"]
    assert [r.rank for r in ranking] == [1, 2, 3]
    assert ranking[0].mean == pytest.approx(0.88)
    assert ranking[0].std == pytest.approx(np.std([0.9, 0.86], ddof=1))
    assert ranking[2].std == 0.0 and ranking[2].num_seeds == 1
    assert ranking[1].accuracies == (0.80, 0.84)
    tied = scaling.rank_configs([("b", 0.5), ("a", 0.5)])
    assert [r.config for r in tied] == ["b", "a"]  # ties keep first-seen order
    with pytest.raises(ValueError, match="Invalid value for `results`"):
        scaling.rank_configs([])
    with pytest.raises(ValueError, match="Invalid value for `accuracy`"):
        scaling.rank_configs([("a", math.inf)])


@pytest.mark.parametrize("seed", range(4))
def test_rank_correlations_match_scipy(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 5, 9).astype(float)  # with ties
    y = x + rng.normal(0, 2, 9)
    assert scaling.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    assert scaling.kendall_tau(x, y) == pytest.approx(stats.kendalltau(x, y)[0], abs=1e-12)


def test_rank_correlation_extremes_and_errors():
    assert scaling.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert scaling.kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(scaling.spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="Invalid value for `y`"):
        scaling.spearman([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="Invalid value for `x`: expected at least 2 items"):
        scaling.kendall_tau([1], [1])


def test_compute_ledger_counts_gradient_evaluations():
    # 2 lrs x 2 K x 2 seeds at B = 256, S = 100, simulating B_ref = 4096.
    runs = [(100, 256, k) for k in (1, 2) for _ in range(2) for _ in range(2)]
    ledger = scaling.compute_ledger(runs, ref_batch_size=4096, final_run=(100, 2))
    assert ledger.num_runs == 8
    assert ledger.search_evaluations == 4 * 100 * 256 * (1 + 2)
    assert ledger.reference_search_evaluations == 4 * 100 * 4096 * (1 + 2)
    assert ledger.saving == pytest.approx(16.0)
    assert ledger.final_run_evaluations == 100 * 4096 * 2
    assert ledger.total_evaluations == ledger.search_evaluations + 819200
    assert ledger.to_dict()["saving"] == pytest.approx(16.0)
    assert scaling.compute_ledger(runs, 4096).final_run_evaluations == 0


@pytest.mark.parametrize(
    "runs, ref, name",
    [
        ([], 4096, "runs"),
        ([(100, 8192, 1)], 4096, "batch_size"),
        ([(0, 256, 1)], 4096, "steps"),
        ([(100, 256, 0)], 4096, "augmult"),
        ([(100, 256, 1)], 0, "ref_batch_size"),
    ],
)
def test_compute_ledger_rejects_bad_input(runs, ref, name):
    with pytest.raises(ValueError, match=f"Invalid value for `{name}`"):
        scaling.compute_ledger(runs, ref)
