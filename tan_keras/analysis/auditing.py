"""Statistics of an empirical privacy audit: epsilon lower bounds from attacks.

An audit runs a membership test many times: in each trial the mechanism runs
either on a dataset D with a canary example ("positive") or on D without it
("negative"), and the attacker says "canary present" when its score reaches a
threshold. Any (epsilon, delta)-DP mechanism forces every such test to satisfy
(Kairouz et al. 2015; Jagielski et al. 2020, "Auditing Differentially Private
Machine Learning: How Private is Private SGD?"; Nasr et al. 2021, "Adversary
Instantiation: Lower Bounds for Differentially Private Machine Learning")

    FPR + e^epsilon * FNR >= 1 - delta   and   FNR + e^epsilon * FPR >= 1 - delta,

so that observed error rates give

    epsilon >= max( log((1 - delta - FNR) / FPR),  log((1 - delta - FPR) / FNR) )
            =  max( log((TPR - delta) / FPR),     log((TNR - delta) / FNR) ).

The rates are only estimated from finitely many trials, so the bound plugs in
Clopper-Pearson upper confidence limits for FPR and FNR: the result is a
lower bound on the mechanism's true epsilon with the stated confidence. An
audit whose lower bound exceeds the epsilon an accountant claims has found a
bug (in the mechanism or in the accountant). A lower bound far below the claim
proves nothing by itself; the audit's strength is shown by the faults it
catches.

No TensorFlow: the Beta quantiles behind Clopper-Pearson come from SciPy.
"""

import bisect
import functools
import math
from typing import Sequence, Tuple

from scipy import stats

from tan_keras import _validate


def clopper_pearson(successes: int, trials: int, confidence: float = 0.95) -> Tuple[float, float]:
    """Two-sided Clopper-Pearson ("exact") confidence interval of a binomial rate.

    With k successes out of n and alpha = 1 - confidence:

      lower = Beta quantile(alpha / 2; k, n - k + 1)       (0 when k = 0),
      upper = Beta quantile(1 - alpha / 2; k + 1, n - k)   (1 when k = n).

    The interval covers the true rate with probability >= `confidence` for
    every rate; each end alone fails with probability <= alpha / 2.

    Args:
      successes: k, an integer in [0, trials].
      trials: n, an integer >= 1.
      confidence: 1 - alpha, a float in (0, 1).

    Returns:
      (lower, upper), floats with 0 <= lower <= k/n <= upper <= 1.

    Raises:
      ValueError: if an argument is out of range.
    """
    trials = _validate.positive_int("trials", trials)
    successes = _validate.integer("successes", successes, low=0, high=trials)
    confidence = _check_confidence(confidence)
    return _clopper_pearson(successes, trials, confidence)


@functools.lru_cache(maxsize=65536)
def _clopper_pearson(k: int, n: int, confidence: float) -> Tuple[float, float]:
    # Cached: threshold searches ask for the same (count, trials) many times.
    alpha = 1.0 - confidence
    lower = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    upper = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lower, upper


def epsilon_lower_bound(
    true_positives: int,
    n_positives: int,
    false_positives: int,
    n_negatives: int,
    delta: float,
    confidence: float = 0.95,
) -> float:
    """Lower bound on epsilon from a membership test's counts (see module doc).

    With FPR_hi and FNR_hi the upper ends of two-sided Clopper-Pearson
    intervals at `confidence` for FP / n_negatives and FN / n_positives,

      epsilon >= max(0, log((1 - delta - FNR_hi) / FPR_hi),
                        log((1 - delta - FPR_hi) / FNR_hi)).

    Each upper end fails with probability <= (1 - confidence) / 2, so both
    hold, and the bound is valid, with probability >= `confidence` (union
    bound) -- provided the threshold of the test was fixed before these
    trials were seen (choose it on separate trials, see `best_threshold`).
    Terms whose numerator is <= 0 carry no evidence; 0 means no evidence.
    "Flagged" means "predicted: canary present"; a test that is reliably
    wrong is informative once its predictions are flipped (pass the flipped
    counts), not as it stands.

    Args:
      true_positives: Positive trials (canary present) flagged, an integer in
        [0, n_positives].
      n_positives: Number of positive trials, an integer >= 1.
      false_positives: Negative trials (canary absent) flagged, an integer in
        [0, n_negatives].
      n_negatives: Number of negative trials, an integer >= 1.
      delta: The delta of the guarantee being audited, a float in (0, 1).
      confidence: Probability that the bound holds, a float in (0, 1).

    Returns:
      The epsilon lower bound, a finite float >= 0.

    Raises:
      ValueError: if an argument is out of range.
    """
    n_positives = _validate.positive_int("n_positives", n_positives)
    n_negatives = _validate.positive_int("n_negatives", n_negatives)
    true_positives = _validate.integer("true_positives", true_positives, low=0, high=n_positives)
    false_positives = _validate.integer("false_positives", false_positives, low=0, high=n_negatives)
    delta = _validate.delta("delta", delta)
    confidence = _check_confidence(confidence)
    return _epsilon_lower_bound(
        true_positives, n_positives, false_positives, n_negatives, delta, confidence
    )


def _epsilon_lower_bound(tp, n_pos, fp, n_neg, delta, confidence):
    fpr_hi = _clopper_pearson(fp, n_neg, confidence)[1]
    fnr_hi = _clopper_pearson(n_pos - tp, n_pos, confidence)[1]
    # Both upper ends are > 0 (Clopper-Pearson never gives 0 as an upper end).
    best = 0.0
    for errors_hi, other_hi in ((fpr_hi, fnr_hi), (fnr_hi, fpr_hi)):
        numerator = 1.0 - delta - other_hi
        if numerator > 0:
            best = max(best, math.log(numerator / errors_hi))
    return best


def best_threshold(
    positive_scores: Sequence[float],
    negative_scores: Sequence[float],
    delta: float,
    confidence: float = 0.95,
) -> Tuple[float, float]:
    """The threshold whose test "score >= threshold" gives the largest bound.

    Use it on selection trials only, then evaluate the chosen threshold with
    `epsilon_lower_bound` on fresh trials: a threshold tuned on the trials it
    is evaluated on over-states the evidence. The test flags high scores; for
    an attack whose canary trials score low, negate the scores.

    The search is exact: for a given count of flagged negatives, lowering the
    threshold to the next positive score only adds true positives, so the
    best threshold is one of the positive scores. Candidates are visited in
    decreasing order of the bound with the observed rates plugged in (an
    upper limit of the Clopper-Pearson bound), so few need the exact bound.

    Args:
      positive_scores: Attack scores of trials with the canary (non-empty).
      negative_scores: Attack scores of trials without it (non-empty).
      delta: The delta being audited, a float in (0, 1).
      confidence: As in `epsilon_lower_bound`.

    Returns:
      (threshold, bound on these trials). The bound is 0 when no threshold
      gives evidence.

    Raises:
      ValueError: on empty or non-finite scores or a bad argument.
    """
    positives = sorted(_finite_scores("positive_scores", positive_scores))
    negatives = sorted(_finite_scores("negative_scores", negative_scores))
    delta = _validate.delta("delta", delta)
    confidence = _check_confidence(confidence)
    n_pos, n_neg = len(positives), len(negatives)
    candidates = []
    for t in sorted(set(positives)):
        tp = n_pos - bisect.bisect_left(positives, t)
        fp = n_neg - bisect.bisect_left(negatives, t)
        candidates.append((_plug_in_bound(tp, n_pos, fp, n_neg, delta), t, tp, fp))
    # Highest plug-in bound first; among ties, the higher threshold.
    candidates.sort(reverse=True)
    best_t, best = candidates[0][1], 0.0
    for optimistic, t, tp, fp in candidates:
        if optimistic <= best:
            break
        bound = _epsilon_lower_bound(tp, n_pos, fp, n_neg, delta, confidence)
        if bound > best:
            best_t, best = t, bound
    return best_t, best


def _plug_in_bound(tp, n_pos, fp, n_neg, delta):
    # The bound with the observed rates instead of their upper confidence
    # limits: never below the Clopper-Pearson bound, which decreases in both
    # rates. Infinite when an error rate is 0.
    fpr, fnr = fp / n_neg, (n_pos - tp) / n_pos
    best = 0.0
    for errors, other in ((fpr, fnr), (fnr, fpr)):
        numerator = 1.0 - delta - other
        if numerator > 0:
            best = max(best, math.inf if errors == 0 else math.log(numerator / errors))
    return best


def count_at_or_above(scores: Sequence[float], threshold: float) -> int:
    """Number of scores >= threshold (the test's "canary present" count).

    Args:
      scores: Attack scores.
      threshold: The test's threshold, a finite float.

    Returns:
      The count, an integer.

    Raises:
      ValueError: on non-finite scores or threshold.
    """
    threshold = _validate.real("threshold", threshold)
    return sum(1 for s in _finite_scores("scores", scores, allow_empty=True) if s >= threshold)


def _finite_scores(name, scores, allow_empty=False):
    values = [float(s) for s in scores]
    if (not values and not allow_empty) or not all(math.isfinite(v) for v in values):
        expected = (
            "a sequence of finite floats"
            if allow_empty
            else "a non-empty sequence of finite floats"
        )
        shown = values if len(values) <= 5 else f"[{len(values)} values]"
        raise _validate.invalid(name, expected, shown)
    return values


def _check_confidence(confidence):
    return _validate.real(
        "confidence", confidence, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False
    )
