"""The TAN scaling law in numbers: fit, extrapolation, ranking, compute.

At a fixed number of steps S and a fixed ratio sigma/B (hence a fixed Total
Amount of Noise), test accuracy is log-linear in the batch size:

    acc(B) = a - b * log2(B)          (b: accuracy lost per doubling of B)

`fit_log_linear` fits a and b by ordinary least squares on every run (all
seeds, all batch sizes) and `LogLinearFit.predict` extrapolates to the
reference batch with a Student-t prediction interval. `rank_configs` orders
hyper-parameter configurations by their simulated accuracy (mean and std over
seeds), `spearman` / `kendall_tau` compare two such orderings, and
`compute_ledger` counts what a search costs in per-example gradient
evaluations (S * B * K per run) against running it at the reference batch.

Uncertainty model: the residuals of the fit estimate one noise level s that
covers seed-to-seed variation and any lack of fit, assumed the same at every
B. Intervals use the exact Student-t quantile with n - 2 degrees of freedom
(SciPy's).
They do not include the error of the law itself outside the fitted range:
an extrapolation far beyond the largest simulated batch is only as good as
the law (the paper: nearly flat on CIFAR-10, ~2 points per doubling on
ImageNet, where small runs over-estimate accuracy but keep the ranking).

No TensorFlow here: these are plain numbers.
"""

import dataclasses
import math
from typing import Any, Dict, Hashable, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from scipy import stats

from tan_keras import _validate


def student_t_critical(confidence: float, dof: int) -> float:
    """The two-sided Student-t critical value: P(|T| <= t) = confidence.

    Args:
      confidence: Coverage of the interval, a float in (0, 1), e.g. 0.95.
      dof: Degrees of freedom, an integer >= 1.

    Returns:
      t > 0 with P(|T_dof| <= t) = confidence (e.g. 12.706 for 0.95 and
      dof = 1, 1.960 as dof grows).

    Raises:
      ValueError: if an argument is out of range.
    """
    confidence = _check_confidence(confidence)
    dof = _validate.positive_int("dof", dof)
    return float(stats.t.ppf(0.5 + confidence / 2.0, dof))


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The fitted law's accuracy at one batch size, with its uncertainty.

    Attributes:
      batch_size: B where the law is evaluated.
      accuracy: a - b * log2(B).
      stderr: Standard error of `accuracy` as an estimate of the mean
        accuracy at B (from the fit only).
      lower: Lower end of the prediction interval: where the mean accuracy of
        `num_runs` new runs at B falls with probability `confidence`.
      upper: Upper end of the prediction interval.
      confidence: Coverage of the interval, e.g. 0.95.
      num_runs: Number of new runs (seeds) the interval is for.
      extrapolated: True when B lies outside the fitted batch sizes.
    """

    batch_size: float
    accuracy: float
    stderr: float
    lower: float
    upper: float
    confidence: float
    num_runs: int
    extrapolated: bool

    def covers(self, accuracy: float) -> bool:
        """Whether a measured (mean) accuracy lies inside the interval."""
        return self.lower <= accuracy <= self.upper

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class LogLinearFit:
    """The least-squares fit of acc(B) = a - b * log2(B).

    Attributes:
      intercept: a, the accuracy the law gives at B = 1.
      slope: b, the accuracy lost per doubling of B (negative: gained).
      intercept_stderr: Standard error of a.
      slope_stderr: Standard error of b.
      residual_std: s, the residual standard deviation (dof = n - 2).
      num_points: n, the number of runs fitted.
      batch_sizes: The distinct batch sizes fitted, ascending.
      log2_mean: Mean of log2(B) over the runs (for predictions).
      log2_sxx: Sum of squared deviations of log2(B) (for predictions).
    """

    intercept: float
    slope: float
    intercept_stderr: float
    slope_stderr: float
    residual_std: float
    num_points: int
    batch_sizes: Tuple[float, ...]
    log2_mean: float
    log2_sxx: float

    @property
    def dof(self) -> int:
        """Residual degrees of freedom, n - 2."""
        return self.num_points - 2

    def slope_interval(self, confidence: float = 0.95) -> Tuple[float, float]:
        """Confidence interval of the slope b.

        Args:
          confidence: Coverage, a float in (0, 1).

        Returns:
          (low, high) = b -/+ t * stderr(b).

        Raises:
          ValueError: if `confidence` is out of range.
        """
        half = student_t_critical(confidence, self.dof) * self.slope_stderr
        return self.slope - half, self.slope + half

    def intercept_interval(self, confidence: float = 0.95) -> Tuple[float, float]:
        """Confidence interval of the intercept a (see `slope_interval`)."""
        half = student_t_critical(confidence, self.dof) * self.intercept_stderr
        return self.intercept - half, self.intercept + half

    def predict(self, batch_size: float, confidence: float = 0.95, num_runs: int = 1) -> Prediction:
        """Accuracy at `batch_size` with a prediction interval.

        The interval is yhat -/+ t_{n-2} * s * sqrt(1/m + 1/n + (x0 - xbar)^2 / Sxx)
        with x0 = log2(batch_size) and m = num_runs: it is meant to contain the
        mean accuracy of m new runs at that batch size.

        Args:
          batch_size: B, a float > 0 (typically the reference batch).
          confidence: Coverage, a float in (0, 1).
          num_runs: m, the number of runs whose mean is compared, an integer
            >= 1.

        Returns:
          A `Prediction`.

        Raises:
          ValueError: if an argument is out of range.
        """
        batch_size = _validate.positive("batch_size", batch_size)
        num_runs = _validate.positive_int("num_runs", num_runs)
        t = student_t_critical(confidence, self.dof)
        x0 = math.log2(batch_size)
        leverage = 1.0 / self.num_points + (x0 - self.log2_mean) ** 2 / self.log2_sxx
        mean = self.intercept - self.slope * x0
        half = t * self.residual_std * math.sqrt(1.0 / num_runs + leverage)
        return Prediction(
            batch_size=batch_size,
            accuracy=mean,
            stderr=self.residual_std * math.sqrt(leverage),
            lower=mean - half,
            upper=mean + half,
            confidence=float(confidence),
            num_runs=num_runs,
            extrapolated=not self.batch_sizes[0] <= batch_size <= self.batch_sizes[-1],
        )

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict (batch_sizes as a list)."""
        result = dataclasses.asdict(self)
        result["batch_sizes"] = list(self.batch_sizes)
        return result


def fit_log_linear(batch_sizes: Sequence[float], accuracies: Sequence[float]) -> LogLinearFit:
    """Fits acc(B) = a - b * log2(B) by least squares on every run.

    Pass one point per run (every seed of every batch size): repeated seeds
    are what the residual noise level is estimated from.

    Args:
      batch_sizes: B of each run, floats > 0.
      accuracies: Accuracy of each run (any finite scale: fraction or %),
        as many as `batch_sizes`.

    Returns:
      A `LogLinearFit`.

    Raises:
      ValueError: if the lengths differ, a value is out of range, fewer than
        two distinct batch sizes are given (no slope), or fewer than three
        runs (no residual to estimate the noise from).
    """
    xs = _reals("batch_sizes", batch_sizes, positive=True)
    ys = _reals("accuracies", accuracies, positive=False)
    if len(xs) != len(ys):
        raise _validate.invalid(
            "accuracies",
            f"one accuracy per batch size ({len(xs)})",
            f"<{len(ys)} values>",
        )
    distinct = tuple(sorted(set(xs)))
    if len(distinct) < 2:
        raise _validate.invalid(
            "batch_sizes",
            "at least 2 distinct batch sizes (a slope needs two)",
            list(batch_sizes),
            hint="Simulate at several batch sizes, e.g. B_ref/16, B_ref/8, B_ref/4",
        )
    if len(xs) < 3:
        raise _validate.invalid(
            "batch_sizes",
            "at least 3 runs (the noise level is estimated from the residuals)",
            list(batch_sizes),
            hint="Add a batch size or a second seed",
        )
    x = np.log2(np.asarray(xs, np.float64))
    y = np.asarray(ys, np.float64)
    n = len(x)
    x_mean = float(x.mean())
    sxx = float(((x - x_mean) ** 2).sum())
    beta = float(((x - x_mean) * (y - y.mean())).sum() / sxx)
    intercept = float(y.mean() - beta * x_mean)
    residuals = y - (intercept + beta * x)
    s = math.sqrt(float((residuals**2).sum()) / (n - 2))
    return LogLinearFit(
        intercept=intercept,
        slope=-beta,
        intercept_stderr=s * math.sqrt(1.0 / n + x_mean**2 / sxx),
        slope_stderr=s / math.sqrt(sxx),
        residual_std=s,
        num_points=n,
        batch_sizes=distinct,
        log2_mean=x_mean,
        log2_sxx=sxx,
    )


@dataclasses.dataclass(frozen=True)
class RankedConfig:
    """One configuration's place in a ranking.

    Attributes:
      rank: 1 for the best configuration.
      config: The configuration, as given (e.g. a tuple of (name, value)).
      mean: Mean accuracy over its seeds.
      std: Sample standard deviation over its seeds (ddof = 1); 0.0 with a
        single seed, when it cannot be estimated (see `num_seeds`).
      num_seeds: Number of runs averaged.
      accuracies: The runs' accuracies, in the order given.
    """

    rank: int
    config: Hashable
    mean: float
    std: float
    num_seeds: int
    accuracies: Tuple[float, ...]


def rank_configs(results: Iterable[Tuple[Hashable, float]]) -> List[RankedConfig]:
    """Ranks configurations by mean accuracy over their runs (best first).

    Args:
      results: (config, accuracy) pairs, one per run; runs of the same
        config (different seeds) share an equal, hashable `config`.

    Returns:
      One `RankedConfig` per distinct config, sorted by decreasing mean;
      ties keep the order in which configs first appear.

    Raises:
      ValueError: if `results` is empty or an accuracy is not finite.
    """
    groups: Dict[Hashable, List[float]] = {}
    for config, accuracy in results:
        groups.setdefault(config, []).append(_validate.real("accuracy", accuracy))
    if not groups:
        raise _validate.invalid("results", "at least one (config, accuracy) pair", [])
    stats = []
    for config, values in groups.items():
        arr = np.asarray(values)
        std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
        stats.append((config, float(arr.mean()), std, tuple(values)))
    stats.sort(key=lambda item: -item[1])  # sort is stable: ties keep order
    return [
        RankedConfig(rank=i + 1, config=c, mean=m, std=s, num_seeds=len(v), accuracies=v)
        for i, (c, m, s, v) in enumerate(stats)
    ]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties).

    Args:
      x: Scores of some items, e.g. accuracies at one batch size.
      y: Scores of the same items, in the same order.

    Returns:
      The correlation in [-1, 1] (nan when one side is constant).

    Raises:
      ValueError: if the lengths differ or fewer than 2 items are given.
    """
    return _rank_correlation(stats.spearmanr, x, y)


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b rank correlation (accounts for ties).

    Args:
      x: Scores of some items.
      y: Scores of the same items, in the same order.

    Returns:
      tau-b in [-1, 1] (nan when one side is constant).

    Raises:
      ValueError: if the lengths differ or fewer than 2 items are given.
    """
    return _rank_correlation(stats.kendalltau, x, y)


def _rank_correlation(statistic, x: Sequence[float], y: Sequence[float]) -> float:
    a, b = _paired(x, y)
    # SciPy warns (and returns nan) on a constant side; nan is the answer.
    if np.all(a == a[0]) or np.all(b == b[0]):
        return math.nan
    return float(statistic(a, b).statistic)


@dataclasses.dataclass(frozen=True)
class ComputeLedger:
    """What a simulated search costs, in per-example gradient evaluations.

    One run of S steps at expected batch B with K views costs S * B * K
    evaluations (forward + backward of one view of one example).

    Attributes:
      ref_batch_size: B_ref, the private run's batch size.
      num_runs: Number of simulated runs counted.
      search_evaluations: Sum of S * B * K over the simulated runs.
      reference_search_evaluations: The same runs at B_ref: sum of S * B_ref * K.
      final_run_evaluations: S * B_ref * K of the final private run (0 if none).
    """

    ref_batch_size: int
    num_runs: int
    search_evaluations: int
    reference_search_evaluations: int
    final_run_evaluations: int = 0

    @property
    def saving(self) -> float:
        """How many times cheaper the simulated search is (B_ref / B for one B)."""
        return self.reference_search_evaluations / self.search_evaluations

    @property
    def total_evaluations(self) -> int:
        """The simulated search plus the final private run."""
        return self.search_evaluations + self.final_run_evaluations

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict, derived values included."""
        return {
            **dataclasses.asdict(self),
            "saving": self.saving,
            "total_evaluations": self.total_evaluations,
        }


def compute_ledger(
    runs: Iterable[Tuple[int, int, int]],
    ref_batch_size: int,
    final_run: Optional[Tuple[int, int]] = None,
) -> ComputeLedger:
    """Counts the gradient evaluations of a search and of its final run.

    Args:
      runs: (steps, batch_size, augmult) of each simulated run (every seed of
        every configuration), integers >= 1, batch_size <= ref_batch_size.
      ref_batch_size: B_ref, an integer >= 1.
      final_run: (steps, augmult) of the private run at B_ref, or None.

    Returns:
      A `ComputeLedger`.

    Raises:
      ValueError: if `runs` is empty or a number is out of range.
    """
    ref = _validate.positive_int("ref_batch_size", ref_batch_size)
    num_runs = search = at_ref = 0
    for steps, batch_size, augmult in runs:
        steps = _validate.positive_int("steps", steps)
        batch_size = _validate.integer("batch_size", batch_size, low=1, high=ref)
        augmult = _validate.positive_int("augmult", augmult)
        num_runs += 1
        search += steps * batch_size * augmult
        at_ref += steps * ref * augmult
    if not num_runs:
        raise _validate.invalid("runs", "at least one (steps, batch_size, augmult)", [])
    final = 0
    if final_run is not None:
        steps, augmult = final_run
        final = _validate.positive_int("steps", steps) * ref
        final *= _validate.positive_int("augmult", augmult)
    return ComputeLedger(ref, num_runs, search, at_ref, final)


def _check_confidence(confidence: Any) -> float:
    return _validate.real(
        "confidence", confidence, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False
    )


def _reals(name: str, values: Any, positive: bool) -> List[float]:
    try:
        items = list(values)
    except TypeError:
        raise _validate.invalid(name, "a sequence of finite floats", values) from None
    check = _validate.positive if positive else _validate.real
    return [check(name, v) for v in items]


def _paired(x: Sequence[float], y: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
    a = np.asarray(_reals("x", x, positive=False))
    b = np.asarray(_reals("y", y, positive=False))
    if len(a) != len(b):
        raise _validate.invalid("y", f"as many scores as x ({len(a)})", f"<{len(b)} values>")
    if len(a) < 2:
        raise _validate.invalid("x", "at least 2 items to rank", list(x))
    return a, b
