r"""Batch scaling at a fixed TAN on digits: is accuracy log-linear in log2 B?

Trains small_cnn on scikit-learn's digits at B in {B_ref/16, ..., B_ref} with
sigma = sigma_ref * B / B_ref and the same S (hence the same eta), several
seeds each, through the training program (`tan_keras.train`, in process, by
way of `tan_keras.training.search_lib`). Fits acc = a - b log2 B on the small batches
only (B <= B_ref / 4), extrapolates to the larger ones and reports whether
the prediction interval (for the mean of the seeds) covers the measured mean.

Full mode (the plot in experiments/README.md; ~6 min on 2 busy CPU cores):
  python experiments/batch_scaling.py --output_dir=experiments/results/batch_scaling
Quick mode (a smoke test: 5 runs of 3 steps):
  python experiments/batch_scaling.py --quick --output_dir=/tmp/batch_scaling
Runs already finished in --output_dir are reused (see tan_keras.training.search_lib).
"""

import math
import sys

import _common
import numpy as np

from tan_keras.analysis import scaling
from tan_keras.training import search_lib


def measure(args, output_dir):
    """Trains (or reuses) every (B, seed) run; returns the search records."""
    batch_sizes = [args.ref_batch_size // 2**k for k in range(args.doublings + 1)]
    spec = search_lib.SearchSpec(
        ref_batch_size=args.ref_batch_size,
        ref_noise_multiplier=args.ref_noise_multiplier,
        steps=args.steps,
        batch_sizes=tuple(batch_sizes),
        dataset="digits",
        grid=search_lib.parse_grid([f"lr={args.lr:g}"]),
        seeds=tuple(range(args.seeds)),
        output_dir=str(output_dir),
        train_flags=(f"--augmult={args.augmult}", f"--ema_decay={args.ema_decay:g}"),
        metric=args.metric,
    )
    runner = search_lib.in_process_runner(log_dir=str(output_dir / "logs"))
    records, _, _ = search_lib.run_search(spec, runner)
    return records


def analyse(records, fit_max_batch, metric, confidence):
    """Fits on B <= fit_max_batch; predicts every larger B for the seeds' mean.

    Returns:
      (fit, rows): the `LogLinearFit` and one row per batch size with the
      measured mean/std and, above fit_max_batch, the prediction interval.
    """
    small = [(r["batch_size"], r[metric]) for r in records if r["batch_size"] <= fit_max_batch]
    fit = scaling.fit_log_linear(*zip(*small))
    rows = []
    for b in sorted({r["batch_size"] for r in records}):
        accs = np.asarray([r[metric] for r in records if r["batch_size"] == b])
        row = {
            "batch_size": b,
            "noise_multiplier": records[[r["batch_size"] for r in records].index(b)][
                "noise_multiplier"
            ],
            "seeds": len(accs),
            "mean": float(accs.mean()),
            "std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0,
            "used_in_fit": b <= fit_max_batch,
        }
        pred = fit.predict(b, confidence, num_runs=len(accs))
        row.update(
            predicted=pred.accuracy,
            lower=pred.lower,
            upper=pred.upper,
            covered=pred.covers(row["mean"]) if b > fit_max_batch else "",
        )
        rows.append(row)
    return fit, rows


def plot(records, fit, rows, fit_max_batch, metric, confidence, path):
    """Accuracy vs log2 B: runs, means, the fit and its extrapolation band."""
    figure, ax = _common.pyplot.subplots(figsize=(4.8, 3.4))
    xs = [math.log2(r["batch_size"]) for r in records]
    ax.plot(xs, [r[metric] for r in records], ".", color="grey", alpha=0.6, label="runs")
    for used, marker, label in ((True, "o", "mean (fitted)"), (False, "s", "mean (held out)")):
        mine = [r for r in rows if r["used_in_fit"] == used]
        ax.errorbar(
            [math.log2(r["batch_size"]) for r in mine],
            [r["mean"] for r in mine],
            yerr=[r["std"] for r in mine],
            fmt=marker,
            color="C0" if used else "C3",
            capsize=3,
            label=label,
        )
    split = math.log2(fit_max_batch)
    fitted, beyond = np.linspace(min(xs), split, 20), np.linspace(split, max(xs), 20)
    ax.plot(fitted, fit.intercept - fit.slope * fitted, "-", color="C0", label="fit a - b log2 B")
    ax.plot(beyond, fit.intercept - fit.slope * beyond, "--", color="C0", label="extrapolation")
    num_runs = max(r["seeds"] for r in rows)
    band = [fit.predict(2.0**x, confidence, num_runs=num_runs) for x in beyond]
    ax.fill_between(
        beyond,
        [p.lower for p in band],
        [p.upper for p in band],
        color="C0",
        alpha=0.15,
        label=f"{confidence:.0%} prediction interval (mean of {num_runs})",
    )
    ticks = sorted({r["batch_size"] for r in records})
    ax.set_xticks([math.log2(b) for b in ticks], [str(b) for b in ticks])
    ax.set_xlabel("batch size B, log2 axis (sigma/B and S fixed)")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
    _common.save(figure, path)


def main(argv=None):
    """Runs the experiment; returns (fit, rows)."""
    parser = _common.parser(__doc__.splitlines()[0], "experiments/results/batch_scaling")
    parser.add_argument("--ref_batch_size", type=int, default=1024)
    parser.add_argument("--ref_noise_multiplier", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--doublings", type=int, default=4, help="Smallest B is B_ref/2**this.")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lr", type=float, default=4.0)
    parser.add_argument("--augmult", type=int, default=1)
    parser.add_argument("--ema_decay", type=float, default=0.99)
    parser.add_argument("--metric", default="test_accuracy_ema")
    parser.add_argument("--confidence", type=float, default=0.95)
    args = parser.parse_args(argv)
    if args.quick:
        args.ref_batch_size, args.steps, args.doublings, args.seeds = 128, 3, 4, 1
    out = _common.output_dir(args.output_dir)
    records = measure(args, out)
    fit_max_batch = args.ref_batch_size // 4
    fit, rows = analyse(records, fit_max_batch, args.metric, args.confidence)
    _common.write_csv(
        out / "batch_scaling_runs.csv",
        [
            {
                k: r[k]
                for k in ("batch_size", "seed", "noise_multiplier", "steps", "eta", args.metric)
            }
            for r in records
        ],
    )
    _common.write_csv(out / "batch_scaling.csv", rows)
    _common.write_json(
        out / "batch_scaling_fit.json",
        {
            "fit": fit.to_dict(),
            "slope_interval": fit.slope_interval(args.confidence),
            "fit_max_batch": fit_max_batch,
            "rows": rows,
        },
    )
    plot(records, fit, rows, fit_max_batch, args.metric, args.confidence, out / "batch_scaling.png")
    low, high = fit.slope_interval(args.confidence)
    print(
        f"fit on B <= {fit_max_batch}: acc = {fit.intercept:.4f} - ({fit.slope:.4f}) log2 B "
        f"(b in [{low:.4f}, {high:.4f}], residual std {fit.residual_std:.4f})"
    )
    for r in rows:
        verdict = "" if r["used_in_fit"] else f" -> {'covered' if r['covered'] else 'NOT covered'}"
        print(
            f"B={r['batch_size']:>5} sigma={r['noise_multiplier']:.4g} mean={r['mean']:.4f} "
            f"+- {r['std']:.4f} (n={r['seeds']}) predicted {r['predicted']:.4f} "
            f"[{r['lower']:.4f}, {r['upper']:.4f}]{verdict}"
        )
    return fit, rows


if __name__ == "__main__":
    main(sys.argv[1:])
