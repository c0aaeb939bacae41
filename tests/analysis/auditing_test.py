"""Tests of tan_keras.analysis.auditing: Clopper-Pearson intervals, epsilon bounds."""

import math

import numpy as np
import pytest
from scipy import stats

from tan_keras.analysis import auditing


def _scipy_clopper_pearson(k, n, confidence):
    alpha = 1 - confidence
    low = 0.0 if k == 0 else stats.beta.ppf(alpha / 2, k, n - k + 1)
    high = 1.0 if k == n else stats.beta.ppf(1 - alpha / 2, k + 1, n - k)
    return low, high


@pytest.mark.parametrize("n", [1, 7, 100, 1000, 100_000])
@pytest.mark.parametrize("confidence", [0.5, 0.95, 0.999])
def test_clopper_pearson_ends_are_where_the_binomial_tails_are_alpha_over_2(n, confidence):
    # The defining property, checked with the binomial distribution rather
    # than the Beta quantiles the interval is computed with.
    half_alpha = (1 - confidence) / 2
    for k in sorted({0, 1, n // 3, n - 1, n}):
        low, high = auditing.clopper_pearson(k, n, confidence)
        assert low <= k / n <= high
        if k > 0:
            assert stats.binom.sf(k - 1, n, low) == pytest.approx(half_alpha, rel=1e-6)
        if k < n:
            assert stats.binom.cdf(k, n, high) == pytest.approx(half_alpha, rel=1e-6)


def test_clopper_pearson_closed_forms_at_zero_and_all_successes():
    # k = 0: upper = 1 - (alpha/2)^(1/n); k = n: lower = (alpha/2)^(1/n).
    n, alpha = 1000, 0.05
    assert auditing.clopper_pearson(0, n)[1] == pytest.approx(1 - (alpha / 2) ** (1 / n), rel=1e-10)
    assert auditing.clopper_pearson(n, n)[0] == pytest.approx((alpha / 2) ** (1 / n), rel=1e-10)
    assert auditing.clopper_pearson(0, n)[0] == 0.0
    assert auditing.clopper_pearson(n, n)[1] == 1.0


@pytest.mark.parametrize("rate", [0.001, 0.03, 0.5, 0.97])
def test_clopper_pearson_covers_the_true_rate_exactly_enough(rate):
    # Exact coverage: the binomial mass of the counts whose interval holds
    # the rate. Clopper-Pearson guarantees >= confidence for every rate.
    n = 200
    covered = [
        lo <= rate <= hi for lo, hi in (auditing.clopper_pearson(k, n) for k in range(n + 1))
    ]
    coverage = stats.binom.pmf(np.arange(n + 1), n, rate)[covered].sum()
    assert coverage >= 0.95


def _bound_by_hand(tp, n_pos, fp, n_neg, delta, confidence=0.95):
    fpr = _scipy_clopper_pearson(fp, n_neg, confidence)[1]
    fnr = _scipy_clopper_pearson(n_pos - tp, n_pos, confidence)[1]
    terms = [0.0]
    if 1 - delta - fnr > 0:
        terms.append(math.log((1 - delta - fnr) / fpr))
    if 1 - delta - fpr > 0:
        terms.append(math.log((1 - delta - fpr) / fnr))
    return max(terms)


@pytest.mark.parametrize(
    "tp,n_pos,fp,n_neg",
    [
        (1000, 1000, 0, 1000),
        (0, 1000, 1000, 1000),
        (0, 1000, 0, 1000),
        (173, 1000, 9, 1000),
        (973, 1000, 890, 1000),
    ],
)
def test_epsilon_lower_bound_is_the_documented_formula(tp, n_pos, fp, n_neg):
    got = auditing.epsilon_lower_bound(tp, n_pos, fp, n_neg, 1e-5)
    assert got == pytest.approx(_bound_by_hand(tp, n_pos, fp, n_neg, 1e-5), rel=1e-8)


def test_perfect_separation_bound_is_limited_by_the_number_of_trials():
    # FPR_hi = 1 - 0.025^(1/n): about 3.7 / n.
    u = 1 - 0.025 ** (1 / 1000)
    expected = math.log((1 - 1e-5 - u) / u)
    assert auditing.epsilon_lower_bound(1000, 1000, 0, 1000, 1e-5) == pytest.approx(expected)
    assert expected == pytest.approx(5.60, abs=0.01)
    # An attacker that is always wrong gives nothing as it stands (FPR = FNR = 1);
    # flipped, it is the perfect attacker above.
    assert auditing.epsilon_lower_bound(0, 1000, 1000, 1000, 1e-5) == 0.0


@pytest.mark.parametrize("tp,fp", [(500, 500), (0, 0), (1000, 1000), (510, 490)])
def test_no_evidence_gives_zero(tp, fp):
    assert auditing.epsilon_lower_bound(tp, 1000, fp, 1000, 1e-5) == 0.0


def test_more_trials_give_a_larger_bound_at_the_same_rates():
    small = auditing.epsilon_lower_bound(90, 100, 10, 100, 1e-5)
    large = auditing.epsilon_lower_bound(9000, 10_000, 1000, 10_000, 1e-5)
    assert 0 < small < large < math.log(0.9 / 0.1)


def _gaussian_population_bound(mu, threshold, delta):
    """The formula with the true error rates of the test "score >= threshold"."""
    fpr = stats.norm.sf(threshold)
    fnr = stats.norm.cdf(threshold - mu)
    return max(0.0, math.log((1 - delta - fnr) / fpr), math.log((1 - delta - fpr) / fnr))


def test_bound_is_valid_with_the_stated_confidence():
    """Simulated audits of a Gaussian mechanism N(mu, 1) vs N(0, 1), fixed threshold.

    The bound must exceed the value the formula gives with the TRUE rates (itself
    <= the mechanism's epsilon) in at most 5% of audits; Clopper-Pearson is
    conservative, so the measured failure rate is far lower. Power check: the
    same bound with point estimates instead of confidence limits fails often.
    """
    rng = np.random.default_rng(1)
    mu, threshold, delta, n, audits = 2.0, 2.5, 1e-5, 1000, 400
    truth = _gaussian_population_bound(mu, threshold, delta)
    tps = rng.binomial(n, stats.norm.sf(threshold - mu), audits)
    fps = rng.binomial(n, stats.norm.sf(threshold), audits)
    bounds = [auditing.epsilon_lower_bound(tp, n, fp, n, delta) for tp, fp in zip(tps, fps)]
    # 400 audits: a true failure rate of 5% exceeds 8% with probability ~0.3%.
    assert np.mean(np.array(bounds) > truth) <= 0.05
    naive = [math.log((tp / n - delta) / max(fp, 1) * n) for tp, fp in zip(tps, fps)]
    assert np.mean(np.array(naive) > truth) > 0.2


def test_best_threshold_separates_separable_scores():
    rng = np.random.default_rng(0)
    positives, negatives = rng.normal(10, 1, 1000), rng.normal(0, 1, 1000)
    threshold, bound = auditing.best_threshold(positives, negatives, 1e-5)
    assert negatives.max() < threshold <= positives.min()
    assert bound == pytest.approx(auditing.epsilon_lower_bound(1000, 1000, 0, 1000, 1e-5))


def test_best_threshold_is_the_best_of_all_thresholds():
    # Exhaustive check of the pruned search on overlapping scores.
    rng = np.random.default_rng(3)
    positives, negatives = rng.normal(2.5, 1, 300), rng.normal(0, 1, 300)
    threshold, bound = auditing.best_threshold(positives, negatives, 1e-5)
    every = [
        auditing.epsilon_lower_bound(
            int((positives >= t).sum()), 300, int((negatives >= t).sum()), 300, 1e-5
        )
        for t in np.concatenate([positives, negatives])
    ]
    assert bound == pytest.approx(max(every))
    assert bound == pytest.approx(
        auditing.epsilon_lower_bound(
            int((positives >= threshold).sum()), 300, int((negatives >= threshold).sum()), 300, 1e-5
        )
    )


def test_best_threshold_finds_little_in_identical_distributions():
    rng = np.random.default_rng(0)
    _, bound = auditing.best_threshold(rng.normal(size=1000), rng.normal(size=1000), 1e-5)
    assert bound < 0.3


def test_count_at_or_above():
    assert auditing.count_at_or_above([0.0, 1.0, 2.0, 2.0], 2.0) == 2
    assert auditing.count_at_or_above([], 0.0) == 0


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda: auditing.clopper_pearson(5, 4), "successes"),
        (lambda: auditing.clopper_pearson(-1, 4), "successes"),
        (lambda: auditing.clopper_pearson(0, 0), "trials"),
        (lambda: auditing.clopper_pearson(1, 4, confidence=1.0), "confidence"),
        (lambda: auditing.clopper_pearson(1.5, 4), "successes"),
        (lambda: auditing.epsilon_lower_bound(11, 10, 0, 10, 1e-5), "true_positives"),
        (lambda: auditing.epsilon_lower_bound(1, 10, -1, 10, 1e-5), "false_positives"),
        (lambda: auditing.epsilon_lower_bound(1, 0, 0, 10, 1e-5), "n_positives"),
        (lambda: auditing.epsilon_lower_bound(1, 10, 0, 0, 1e-5), "n_negatives"),
        (lambda: auditing.epsilon_lower_bound(1, 10, 0, 10, 0.0), "delta"),
        (lambda: auditing.epsilon_lower_bound(1, 10, 0, 10, 1e-5, 0.0), "confidence"),
        (lambda: auditing.best_threshold([], [0.0], 1e-5), "positive_scores"),
        (lambda: auditing.best_threshold([0.0], [float("nan")], 1e-5), "negative_scores"),
        (lambda: auditing.count_at_or_above([0.0], float("inf")), "threshold"),
    ],
)
def test_bad_arguments_are_refused_by_name(call, name):
    with pytest.raises(ValueError, match=f"Invalid value for `{name}`"):
        call()


def test_module_does_not_import_tensorflow():
    import subprocess
    import sys

    code = "import sys, tan_keras.analysis.auditing; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
