r"""Do cheap simulations rank hyper-parameters as the large run does? (digits)

A grid (learning rate x augmentation multiplicity K) is trained at two batch
sizes with the same S and sigma/B (sigma = sigma_ref * B / B_ref), several
seeds each, through the training program (in process, via
`tan_keras.training.search_lib`). Configurations are ranked by their mean accuracy at
each batch size and the two rankings compared with Spearman's rho and
Kendall's tau-b (numpy implementations in `tan_keras.analysis.scaling`; checked
against scipy when it is installed).

Full mode (the plot in experiments/README.md; ~5 min on 2 busy CPU cores):
  python experiments/ranking.py --output_dir=experiments/results/ranking
Quick mode (a smoke test: 6 runs of 2 steps):
  python experiments/ranking.py --quick --output_dir=/tmp/ranking
"""

import sys

import _common

from tan_keras.analysis import scaling
from tan_keras.training import search_lib


def rank_both(records, batch_sizes, configs, metric):
    """Per config: mean/std/rank at each batch size; and the rank correlations."""
    rankings = {
        b: {
            r.config: r
            for r in scaling.rank_configs(
                (rec["config"], rec[metric]) for rec in records if rec["batch_size"] == b
            )
        }
        for b in batch_sizes
    }
    rows = []
    for config in configs:
        row = {"config": search_lib.config_label(config)}
        for b in batch_sizes:
            entry = rankings[b][config]
            row.update({f"mean_B{b}": entry.mean, f"std_B{b}": entry.std, f"rank_B{b}": entry.rank})
        rows.append(row)
    small, large = ([row[f"mean_B{b}"] for row in rows] for b in batch_sizes)
    summary = {
        "batch_sizes": list(batch_sizes),
        "spearman": scaling.spearman(small, large),
        "kendall_tau": scaling.kendall_tau(small, large),
        "same_best": min(rows, key=lambda r: r[f"rank_B{batch_sizes[0]}"])["config"]
        == min(rows, key=lambda r: r[f"rank_B{batch_sizes[1]}"])["config"],
    }
    try:  # A cross-check only: the package itself never needs scipy.
        from scipy import stats

        summary["scipy_spearman"] = float(stats.spearmanr(small, large)[0])
        summary["scipy_kendall_tau"] = float(stats.kendalltau(small, large)[0])
    except ImportError:
        pass
    return rows, summary


def plot(rows, batch_sizes, path):
    """Left: each config's rank at both B. Right: mean accuracies, zoomed on the good ones."""
    small, large = batch_sizes
    figure, (left, right) = _common.pyplot.subplots(1, 2, figsize=(8.4, 3.4))
    for i, row in enumerate(rows):
        ranks = [row[f"rank_B{small}"], row[f"rank_B{large}"]]
        left.plot([0, 1], ranks, "o-", color=f"C{i}")
        left.annotate(
            row["config"], (1, ranks[1]), xytext=(6, -3), textcoords="offset points", fontsize=7
        )
    left.set_xticks([0, 1], [f"B = {small}\n(simulation)", f"B = {large}"])
    left.set_xlim(-0.2, 1.8)
    left.set_ylim(len(rows) + 0.5, 0.5)
    left.set_ylabel("rank (1 = best mean accuracy)")
    # Diverged configurations (near chance) would squash the others together.
    good = [r for r in rows if min(r[f"mean_B{small}"], r[f"mean_B{large}"]) > 0.5] or rows
    for row in good:
        i = rows.index(row)
        right.errorbar(
            row[f"mean_B{small}"],
            row[f"mean_B{large}"],
            xerr=row[f"std_B{small}"],
            yerr=row[f"std_B{large}"],
            fmt="o",
            color=f"C{i}",
            capsize=2,
            label=row["config"],
        )
    values = [r[f"mean_B{b}"] for r in good for b in batch_sizes]
    span = [min(values) - 0.01, max(values) + 0.01]
    right.plot(span, span, "k--", lw=1, label="y = x")
    right.set_xlabel(f"mean accuracy at B = {small}")
    right.set_ylabel(f"mean accuracy at B = {large}")
    right.set_title("configs above 0.5 (+- std over seeds)", fontsize=8)
    right.legend(fontsize=6)
    _common.save(figure, path)


def main(argv=None):
    """Runs the experiment; returns (rows, summary)."""
    parser = _common.parser(__doc__.splitlines()[0], "experiments/results/ranking")
    parser.add_argument("--ref_batch_size", type=int, default=1024)
    parser.add_argument("--ref_noise_multiplier", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch_sizes", type=_common.ints, default=[64, 512])
    parser.add_argument("--grid", default="lr=1,4,16;augmult=1,2")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--ema_decay", type=float, default=0.99)
    parser.add_argument("--metric", default="test_accuracy_ema")
    args = parser.parse_args(argv)
    if args.quick:
        args.ref_batch_size, args.steps, args.batch_sizes = 64, 2, [8, 32]
        args.grid, args.seeds = "lr=1,4,16", 1
    out = _common.output_dir(args.output_dir)
    spec = search_lib.SearchSpec(
        ref_batch_size=args.ref_batch_size,
        ref_noise_multiplier=args.ref_noise_multiplier,
        steps=args.steps,
        batch_sizes=tuple(args.batch_sizes),
        dataset="digits",
        grid=search_lib.parse_grid([args.grid]),
        seeds=tuple(range(args.seeds)),
        output_dir=str(out),
        train_flags=(f"--ema_decay={args.ema_decay:g}",),
        metric=args.metric,
    )
    if len(spec.batch_sizes) != 2:
        parser.error("--batch_sizes takes exactly two batch sizes")
    runner = search_lib.in_process_runner(log_dir=str(out / "logs"))
    records, _, _ = search_lib.run_search(spec, runner)
    rows, summary = rank_both(records, spec.batch_sizes, spec.configs, args.metric)
    _common.write_csv(out / "ranking.csv", rows)
    _common.write_json(out / "ranking.json", {"rows": rows, **summary})
    plot(rows, spec.batch_sizes, out / "ranking.png")
    small, large = spec.batch_sizes
    for row in rows:
        print(
            f"{row['config']:<22} B={small}: {row[f'mean_B{small}']:.4f} "
            f"(rank {row[f'rank_B{small}']})  B={large}: {row[f'mean_B{large}']:.4f} "
            f"(rank {row[f'rank_B{large}']})"
        )
    print(
        f"Spearman {summary['spearman']:.3f}, Kendall tau-b {summary['kendall_tau']:.3f}, "
        f"same best config: {summary['same_best']}"
    )
    return rows, summary


if __name__ == "__main__":
    main(sys.argv[1:])
