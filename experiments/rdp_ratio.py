r"""Why eps_TAN works, and where it stops: the RDP ratio (paper, Figure 3).

The per-step Renyi DP of the Poisson-subsampled Gaussian, g_alpha(sigma, q),
computed by dp_accounting's RDP accountant at single orders, divided by the
TAN approximation alpha * eta_step**2 (eta_step = q / (sqrt(2) sigma)). At a
fixed eta_step the ratio stays ~1 up to large orders for sigma >= 3 and
explodes for sigma <= 0.75: there the TAN estimate undercharges.

Full mode (the plot in experiments/README.md):
  python experiments/rdp_ratio.py --output_dir=experiments/results/rdp_ratio
Quick mode:
  python experiments/rdp_ratio.py --quick --output_dir=/tmp/rdp_ratio
"""

import math
import sys

import _common
import numpy as np
from dp_accounting import rdp

from tan_keras.privacy import accounting, tan


def rdp_ratio(sigma, eta_step, orders):
    """g_alpha(sigma, q) / (alpha * eta_step**2) at q = sqrt(2) * sigma * eta_step.

    Args:
      sigma: Noise multiplier.
      eta_step: Per-step TAN to hold fixed.
      orders: Renyi orders alpha (> 1).

    Returns:
      (q, ratios): the sampling rate and one ratio per order.
    """
    q = math.sqrt(2.0) * sigma * eta_step
    assert math.isclose(tan.eta_step(sigma, q), eta_step)
    # One step (S = 1) of the package's own event; the accountant evaluates
    # the subsampled-Gaussian RDP at exactly these orders.
    accountant = rdp.RdpAccountant(orders=list(orders)).compose(
        accounting.dp_event_for(sigma, q, 1)
    )
    return q, np.asarray(accountant.rdp) / (np.asarray(orders) * eta_step**2)


def main(argv=None):
    """Runs the experiment; returns the rows it wrote."""
    parser = _common.parser(__doc__.splitlines()[0], "experiments/results/rdp_ratio")
    parser.add_argument("--eta_step", type=float, default=0.01)
    args = parser.parse_args(argv)
    out = _common.output_dir(args.output_dir)
    if args.quick:
        sigmas, orders = [0.5, 1.0, 3.0], [2.0, 8.0, 32.0]
    else:
        sigmas = [0.5, 0.75, 1.0, 2.0, 3.0, 5.0]
        orders = [float(a) for a in np.round(np.geomspace(1.25, 256.0, 40), 3)]
    rows = []
    figure, ax = _common.pyplot.subplots(figsize=(4.8, 3.4))
    for sigma in sigmas:
        q, ratios = rdp_ratio(sigma, args.eta_step, orders)
        rows += [
            {
                "sigma": sigma,
                "sampling_rate": q,
                "eta_step": args.eta_step,
                "alpha": a,
                "ratio": float(r),
            }
            for a, r in zip(orders, ratios)
        ]
        ax.plot(orders, ratios, "-", label=f"sigma = {sigma:g} (q = {q:.3g})")
    ax.axhline(1.0, color="k", ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("Renyi order alpha")
    ax.set_ylabel("g_alpha / (alpha eta_step^2)")
    ax.set_title(f"eta_step = {args.eta_step:g}")
    ax.legend(fontsize=7)
    _common.save(figure, out / "rdp_ratio.png")
    _common.write_csv(out / "rdp_ratio.csv", rows)
    for sigma in sigmas:
        mine = {r["alpha"]: r["ratio"] for r in rows if r["sigma"] == sigma}
        shown = ", ".join(f"a={a:g}: {mine[a]:.3g}" for a in orders[:: max(1, len(orders) // 6)])
        print(f"sigma={sigma:g}: {shown}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
