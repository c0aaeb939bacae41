r"""The package's noise calibration against dp-accounting's generic one.

For the paper's runs and the CPU default, finds the noise multiplier that
meets a target epsilon two ways and prints, side by side: accountant calls,
wall time, the epsilon reached and whether it stays within the budget.

  * tan_keras: `accounting.calibrate_noise_multiplier` (eps_TAN starting
    guess, safeguarded false position on log-log axes, stops once the budget
    is spent to within `tolerance`).
  * dp-accounting: `dp_accounting.calibrate_dp_mechanism` (Brent's method on
    sigma from a bracket it grows from [0, 1], to `tol` in sigma).

Usage:
  python benchmarks/calibration_benchmark.py [--accountant=rdp|pld]
"""

import argparse
import math
import time

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from tan_keras.privacy import accounting

# (name, N, B, S, delta, target epsilon)
CASES = (
    ("digits default", 1437, 512, 200, 1e-5, 8.0),
    ("CIFAR-10, paper", 50_000, 4096, 2500, 1e-5, 8.0),
    ("CIFAR-10, eps 1", 50_000, 4096, 2500, 1e-5, 1.0),
    ("ImageNet, paper", 1_281_167, 32768, 18_000, 8e-7, 8.0),
    ("small q, many steps", 50_000, 256, 10_000, 1e-5, 3.0),
)


class _Counted:
    """Wraps a function and counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def _fresh(accountant):
    if accountant == "pld":
        return lambda: pld_privacy_accountant.PLDAccountant()
    return lambda: rdp_privacy_accountant.RdpAccountant()


def _package(q, steps, delta, target, accountant):
    counted = _Counted(accounting._epsilon)
    original, accounting._epsilon = accounting._epsilon, counted
    try:
        start = time.perf_counter()
        sigma = accounting.calibrate_noise_multiplier(target, q, steps, delta, accountant)
        seconds = time.perf_counter() - start
    finally:
        accounting._epsilon = original
    return sigma, counted.calls, seconds


def _generic(q, steps, delta, target, accountant, tol):
    event = _Counted(lambda sigma: accounting.dp_event_for(max(sigma, 1e-9), q, steps))
    start = time.perf_counter()
    sigma = dp_accounting.calibrate_dp_mechanism(_fresh(accountant), event, target, delta, tol=tol)
    return sigma, event.calls, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--accountant", choices=accounting.ACCOUNTANTS, default="rdp")
    parser.add_argument("--tol", type=float, default=1e-3, help="dp-accounting's tol in sigma")
    parser.add_argument(
        "--cases", type=int, default=len(CASES), help=f"the first N of the {len(CASES)} cases"
    )
    args = parser.parse_args()
    if not 1 <= args.cases <= len(CASES):
        parser.error(f"--cases must be in [1, {len(CASES)}], got {args.cases}")
    header = (
        f"{'case':<22}{'method':<15}{'sigma':>12}{'epsilon':>10}{'within':>8}"
        f"{'calls':>7}{'seconds':>9}"
    )
    print(f"accountant={args.accountant}; dp-accounting tol={args.tol:g} in sigma")
    print(header)
    totals = {"tan_keras": [0, 0.0], "dp-accounting": [0, 0.0]}
    for name, n, b, steps, delta, target in CASES[: args.cases]:
        q = b / n
        runs = (
            ("tan_keras", _package(q, steps, delta, target, args.accountant)),
            ("dp-accounting", _generic(q, steps, delta, target, args.accountant, args.tol)),
        )
        for method, (sigma, calls, seconds) in runs:
            eps = accounting.compute_epsilon(sigma, q, steps, delta, args.accountant)
            within = "yes" if eps <= target else "NO"
            print(
                f"{name:<22}{method:<15}{sigma:>12.6f}{eps:>10.4f}{within:>8}"
                f"{calls:>7}{seconds:>9.2f}"
            )
            totals[method][0] += calls
            totals[method][1] += seconds
    ours, theirs = totals["tan_keras"], totals["dp-accounting"]
    print(
        f"total: tan_keras {ours[0]} calls, {ours[1]:.2f} s; dp-accounting {theirs[0]} calls, "
        f"{theirs[1]:.2f} s; dp-accounting / tan_keras time = "
        f"{theirs[1] / ours[1] if ours[1] > 0 else math.nan:.2f}x"
    )


if __name__ == "__main__":
    main()
