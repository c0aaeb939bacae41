r"""The privacy wall: exact epsilon vs sigma at a fixed TAN (paper, Figure 2).

At a fixed Total Amount of Noise eta and number of steps S, the sampling
rate is q = eta * sqrt(2) * sigma / sqrt(S): raising sigma raises q with it.
For sigma >~ 2 the exact epsilon (RDP accountant) collapses onto the TAN
estimate eps_TAN(eta, delta), whatever S; below it, epsilon climbs a wall.

Full mode (the plot in experiments/README.md):
  python experiments/privacy_wall.py --output_dir=experiments/results/privacy_wall
Quick mode (a smoke test, seconds):
  python experiments/privacy_wall.py --quick --output_dir=/tmp/privacy_wall
"""

import math
import sys

import _common
import numpy as np
from matplotlib import ticker

from tan_keras.privacy import accounting, tan


def run(etas, steps_list, sigmas, delta):
    """Exact and TAN epsilons on the grid eta x S x sigma.

    Args:
      etas: Total Amounts of Noise to hold fixed.
      steps_list: Numbers of steps S.
      sigmas: Noise multipliers; those needing q > 1 are skipped.
      delta: Target delta.

    Returns:
      A list of dict rows: eta, steps, sigma, sampling_rate, epsilon, eps_tan.
    """
    rows = []
    for eta in etas:
        estimate = tan.eps_tan(eta, delta)
        for steps in steps_list:
            for sigma in sigmas:
                q = eta * math.sqrt(2.0) * sigma / math.sqrt(steps)
                if q > 1.0:
                    continue
                rows.append(
                    {
                        "eta": eta,
                        "steps": steps,
                        "sigma": sigma,
                        "sampling_rate": q,
                        "epsilon": accounting.compute_epsilon(sigma, q, steps, delta),
                        "eps_tan": estimate,
                    }
                )
    return rows


def plot(rows, etas, path):
    """One panel per eta: epsilon vs sigma (log x) per S, eps_TAN dashed."""
    figure, axes = _common.pyplot.subplots(1, len(etas), figsize=(4.2 * len(etas), 3.3))
    axes = np.atleast_1d(axes)
    for ax, eta in zip(axes, etas):
        mine = [r for r in rows if r["eta"] == eta]
        for steps in sorted({r["steps"] for r in mine}):
            curve = [r for r in mine if r["steps"] == steps]
            ax.plot(
                [r["sigma"] for r in curve],
                [r["epsilon"] for r in curve],
                "o-",
                ms=3,
                label=f"S = {steps:,}",
            )
        ax.axhline(mine[0]["eps_tan"], color="k", ls="--", lw=1, label="eps_TAN")
        ax.axvline(tan.OVERCHARGE_SIGMA, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):  # plain 0.5, 1, 2, 5, ... not 5 x 10^-1
            axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            axis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("noise multiplier sigma")
        ax.set_ylabel("epsilon (RDP)")
        ax.set_title(f"eta = {eta:g}")
        ax.legend(fontsize=7)
    _common.save(figure, path)


def main(argv=None):
    """Runs the experiment; returns the rows it wrote."""
    parser = _common.parser(__doc__.splitlines()[0], "experiments/results/privacy_wall")
    parser.add_argument("--delta", type=float, default=8e-7)
    args = parser.parse_args(argv)
    out = _common.output_dir(args.output_dir)
    if args.quick:
        etas, steps_list, sigmas = [0.95], [1000, 10000], [0.5, 1.0, 2.0, 5.0]
    else:
        etas, steps_list = [0.95, 0.13], [1000, 10000, 100000]
        # A log grid plus the sigmas tabulated in docs/tan-method.md, section 3.
        grid = np.round(np.geomspace(0.4, 10.0, 19), 3)
        sigmas = sorted({float(s) for s in grid} | {0.5, 1.0, 2.0, 3.0, 5.0})
    rows = run(etas, steps_list, sigmas, args.delta)
    _common.write_csv(out / "privacy_wall.csv", rows)
    plot(rows, etas, out / "privacy_wall.png")
    for eta in etas:
        print(f"eta={eta:g} delta={args.delta:g} eps_TAN={tan.eps_tan(eta, args.delta):.3f}")
        for r in rows:
            if r["eta"] == eta:
                print(f"  S={r['steps']:>6} sigma={r['sigma']:<6g} epsilon={r['epsilon']:.3f}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
