"""Times one DP train step of a text model whose Embedding is ghost-clipped.

The model is Embedding(vocab, dim) -> GlobalAveragePooling1D -> Dense(2) on
[batch, T] token ids (Zipf-distributed, so examples repeat some ids). On the
same model and data, side by side:
  plain    -- the ordinary Keras train step (baseline);
  dp_vmap  -- DPKerasModel(clipping="vectorized"): the table's per-example
              gradients formed by tf.vectorized_map ([batch, vocab, dim]);
  dp_ghost -- DPKerasModel(clipping="ghost"): the Embedding's norms and
              clipped sum from its ids and output gradients
              (tan_keras.mechanism.ghost), the Dense kernel's by ghost norm
              too; the child checks that the Embedding was selected.
and, apart, the part of the step that differs, per-example gradients and
`clip_and_sum` in one tf.function (no noise, no update):
  clip_vmap  -- every per-example gradient formed (baseline of this part);
  clip_ghost -- with the layers `ghost.select_layers` picks.
The DP steps also draw Gaussian noise for every entry of the table, which a
plain step (a sparse update of the rows looked up) does not: at vocab x dim
entries, that alone can outweigh the rest of a ghost step.

Each method runs in its own subprocess, so that its peak memory (max RSS) is
its own; with --repeats=R the methods run R times, interleaved. A method's
time is the median over its runs of the median over timed steps after
warm-up. Prints ms per step, examples/s, the slowdown against the plain step
and against dp_vmap, and peak memory.

Example (CPU, 25 s on 2 cores):
  python benchmarks/embedding_ghost_benchmark.py --vocab=20000 --dim=64 \
      --length=32 --batch=64
"""

import argparse
import json
import statistics
import sys

from _bench import (
    check_args,
    child_result,
    chunk_arg,
    fmt_ratio,
    keras_train_step,
    median_seconds,
    peak_rss_mb,
    print_result,
)

METHODS = ("plain", "dp_vmap", "dp_ghost", "clip_vmap", "clip_ghost")
DP_CLIPPING = {"dp_vmap": "vectorized", "dp_ghost": "ghost"}
BASELINES = ("plain", "dp_vmap", "clip_vmap")


def _baselines(method):
    """The baselines a method is compared with: whole steps with steps, parts with parts."""
    return ("clip_vmap",) if method.startswith("clip_") else ("plain", "dp_vmap")


def _measure(args, method):
    """Runs in a child process: median seconds per step, max RSS, ghost layers."""
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    inp = keras.Input((args.length,), dtype="int32")
    h = keras.layers.Embedding(args.vocab, args.dim, name="embedding")(inp)
    out = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling1D()(h))
    base = keras.Model(inp, out)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rng = np.random.default_rng(0)
    views = args.augmult
    ids = (rng.zipf(1.2, (args.batch, views, args.length)) - 1) % args.vocab
    y = rng.integers(0, 2, args.batch).astype(np.int32)
    ghost_layers = []
    if method.startswith("clip_"):
        return _measure_clipping(args, method, base, loss, ids, y)
    if method == "plain":
        model = base
        data = (ids.reshape(-1, args.length).astype(np.int32), np.repeat(y, views))
    else:
        from tan_keras.keras_dp.dp_model import DPKerasModel

        model = DPKerasModel(
            base.inputs,
            base.outputs,
            l2_norm_clip=1.0,
            noise_multiplier=1.0,
            expected_batch_size=args.batch,
            dataset_size=50000,
            augmult=views,
            clipping=DP_CLIPPING[method],
            examples_per_chunk=chunk_arg(args.examples_per_chunk),
        )
        x = ids.astype(np.int32) if views > 1 else ids[:, 0].astype(np.int32)
        data = (x, y, np.ones(args.batch, np.float32), np.ones(args.batch, bool))
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss)
    if method != "plain":
        ghost_layers = [layer.name for layer in model._ghost_layers]
        if method == "dp_ghost" and "embedding" not in ghost_layers:
            raise RuntimeError(f"the Embedding was not ghost-clipped: {ghost_layers}")
    return {
        "seconds_per_step": median_seconds(keras_train_step(model, data), args.steps, args.warmup),
        "peak_rss_mb": peak_rss_mb(),
        "ghost_layers": ghost_layers,
    }


def _measure_clipping(args, method, model, loss, ids, y):
    """Per-example gradients and clip_and_sum alone, in one tf.function."""
    import tensorflow as tf

    from tan_keras.mechanism import ghost, per_example
    from tan_keras.mechanism.clipping import clip_and_sum

    loss_fn = per_example.unreduced_loss_fn(loss)
    layers = ghost.select_layers(model, args.augmult) if method == "clip_ghost" else []
    if method == "clip_ghost" and model.get_layer("embedding") not in layers:
        raise RuntimeError("the Embedding was not selected")
    views, labels = tf.constant(ids.astype("int32")), tf.constant(y)
    mask = tf.ones([args.batch])

    @tf.function
    def step():
        grads = per_example.per_example_gradients(model, loss_fn, views, labels, layers)[0]
        return clip_and_sum(grads, 1.0, mask).grad_sum

    def wait():
        tf.nest.map_structure(lambda t: t.numpy(), step())

    return {
        "seconds_per_step": median_seconds(wait, args.steps, args.warmup),
        "peak_rss_mb": peak_rss_mb(),
        "ghost_layers": [layer.name for layer in layers],
    }


def _run_child(args, method):
    cmd = [sys.executable, __file__, "--child", f"--methods={method}"] + [
        f"--{name}={getattr(args, name)}"
        for name in ("vocab", "dim", "length", "batch", "augmult", "steps", "warmup")
    ]
    cmd.append(f"--examples_per_chunk={args.examples_per_chunk}")
    return child_result(cmd, method)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--length", type=int, default=32, help="T, ids per example")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--augmult", type=int, default=1, help="K views per example")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--repeats", type=int, default=1, help="interleaved runs of each method (median)"
    )
    parser.add_argument(
        "--examples_per_chunk",
        default="auto",
        help="DPKerasModel's examples_per_chunk: 'auto', 'none' or an integer",
    )
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    for method in methods:
        if method not in METHODS:
            parser.error(f"--methods: unknown method {method!r}; expected {METHODS}")
    check_args(
        parser,
        args,
        (
            ("vocab", 1),
            ("dim", 1),
            ("length", 1),
            ("batch", 1),
            ("augmult", 1),
            ("repeats", 1),
            ("steps", 1),
            ("warmup", 0),
        ),
    )
    if args.child:
        print_result(_measure(args, methods[0]))
        return

    runs = {method: [] for method in methods}
    for _ in range(args.repeats):
        for method in methods:
            runs[method].append(_run_child(args, method))
    results = {
        method: {
            "seconds_per_step": statistics.median(r["seconds_per_step"] for r in method_runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in method_runs),
            "ghost_layers": method_runs[0]["ghost_layers"],
        }
        for method, method_runs in runs.items()
    }
    print(
        f"Embedding({args.vocab}, {args.dim}) -> pooling -> Dense(2); B={args.batch}, "
        f"T={args.length}, K={args.augmult}, examples_per_chunk={args.examples_per_chunk}"
    )
    print(
        f"{'method':<10} {'ms/step':>9} {'ex/s':>9} "
        + " ".join(f"{'vs ' + base:>11}" for base in BASELINES)
        + f" {'peak MB':>8}  ghost layers"
    )
    rows = []
    for method, result in results.items():
        seconds = result["seconds_per_step"]
        row = dict(method=method, **result, examples_per_s=args.batch / seconds)
        # Ratios are slowdowns: step time relative to the baseline's.
        for base in _baselines(method):
            if base in results:
                row[f"slowdown_vs_{base}"] = seconds / results[base]["seconds_per_step"]
        rows.append(row)
        ratios = " ".join(f"{fmt_ratio(row.get('slowdown_vs_' + base)):>11}" for base in BASELINES)
        print(
            f"{method:<10} {1000 * seconds:>9.1f} {row['examples_per_s']:>9.1f} {ratios} "
            f"{result['peak_rss_mb']:>8.0f}  {', '.join(result['ghost_layers']) or '-'}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
