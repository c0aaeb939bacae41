"""Times the DP train step of DPKerasModel next to the plain Keras step.

One run measures, on the same model and the same data, side by side:
  plain  -- the ordinary Keras train step (a batch of B*K images, mean loss);
  dp_ghost -- tan_keras.DPKerasModel with clipping="ghost" (tf.vectorized_map,
            with ghost norms where they are cheaper; what clipping="auto"
            picks without XLA);
  dp_vmap -- tan_keras.DPKerasModel with clipping="vectorized" (every
            per-example gradient formed by tf.vectorized_map);
  dp_layer -- tan_keras.DPKerasModel with clipping="layerwise" (activations x
            output gradients; what "auto" picks with --jit);
  tfp    -- TF Privacy's DPModel as shipped (use_xla=True, its default);
  tfp_noxla -- the same with use_xla=False, like for like with the steps
            above when they run without --jit.
TF Privacy has no augmentation multiplicity, so it runs at K = 1 only.

TF Privacy 0.9 (its last release) runs only on TensorFlow 2.15 / Keras 2 /
Python <= 3.11, so its methods run in their own environment, given by
--tfp_python (see benchmarks/README.md), next to that stack's own plain step.
Every slowdown is against the plain step of the same stack: "vs plain" is
the method's step time over its stack's plain step, and "vs tfp" divides
tan_keras's slowdown by TF Privacy's, so that the two TensorFlow versions'
own speeds cancel out. Without --tfp_python the tfp methods are skipped.

Each configuration runs in its own subprocess, so its peak memory (max RSS) is
its own. With --repeats=R the methods of a configuration run R times,
interleaved (plain, dp, ..., plain, dp, ...), so that a slow spell of the
machine hits all of them alike; a method's time is the median over its runs of
the median over timed steps after warm-up. Prints examples/s, the slowdown
relative to the plain step and to both TF Privacy variants, and peak memory;
writes JSON.

Example (CPU, about 30 minutes):
  python benchmarks/dp_step_benchmark.py --models=small_cnn,wrn16_4 \
      --batch_sizes=32,64 --augmults=1,4 --repeats=2 --json=/tmp/bench.json
"""

import argparse
import json
import os
import statistics
import sys

import zoo
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

METHODS = ("plain", "dp_ghost", "dp_vmap", "dp_layer", "tfp", "tfp_noxla")
TFP_METHODS = ("tfp", "tfp_noxla")
# The plain step timed in TF Privacy's environment: the baseline of its ratios.
TFP_PLAIN = "tfp_plain"
DP_CLIPPING = {"dp_ghost": "ghost", "dp_vmap": "vectorized", "dp_layer": "layerwise"}
BASELINES = ("plain", "tfp", "tfp_noxla")
INPUT_SHAPES = {"small_cnn": (32, 32, 3), "wrn16_4": (32, 32, 3)}


def _measure(model_name, method, batch, augmult, steps, warmup, jit, examples_per_chunk):
    """Runs in a child process: returns median seconds per step and max RSS."""
    import keras
    import numpy as np

    from tan_keras.models import build_model

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    if model_name in zoo.ZOO:
        base = zoo.ZOO[model_name].build()

        def inputs(leading):
            return zoo.inputs(model_name, leading, rng)

    else:
        shape = INPUT_SHAPES[model_name]
        base = build_model(model_name, shape, 10)

        def inputs(leading):
            return rng.random(leading + shape, dtype=np.float32)

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    y = rng.integers(0, 10, batch).astype(np.int32)
    if method in ("plain", TFP_PLAIN):
        model = base
        x = inputs((batch * augmult,))
        data = (x, np.repeat(y, augmult))
    elif method in DP_CLIPPING:
        from tan_keras.keras_dp.dp_model import make_private

        model = make_private(
            base,
            l2_norm_clip=1.0,
            noise_multiplier=1.0,
            expected_batch_size=batch,
            dataset_size=50000,
            augmult=augmult,
            clipping=DP_CLIPPING[method],
            examples_per_chunk=examples_per_chunk,
            **zoo.private_kwargs(model_name),
        )
        x = inputs((batch, augmult) if augmult > 1 else (batch,))
        data = (x, y, np.ones(batch, np.float32), np.ones(batch, bool))
    else:
        from tensorflow_privacy.privacy.keras_models.dp_keras_model import DPModel

        if augmult != 1 or model_name in zoo.ZOO:  # (Keras 2 lacks some zoo layers)
            return None
        model = DPModel(
            l2_norm_clip=1.0,
            noise_multiplier=1.0,
            use_xla=method == "tfp",
            inputs=base.inputs,
            outputs=base.outputs,
        )
        data = (inputs((batch,)), y)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss, jit_compile=jit)
    seconds = median_seconds(keras_train_step(model, data), steps, warmup)
    return {"seconds_per_step": seconds, "peak_rss_mb": peak_rss_mb()}


def _run_child(args, model_name, method, batch, augmult):
    in_tfp_env = method in TFP_METHODS or method == TFP_PLAIN
    python = args.tfp_python if in_tfp_env else sys.executable
    cmd = (
        [
            python,
            __file__,
            "--child",
            f"--models={model_name}",
            f"--methods={method}",
            f"--batch_sizes={batch}",
            f"--augmults={augmult}",
            f"--steps={args.steps}",
            f"--warmup={args.warmup}",
        ]
        + (["--jit"] if args.jit else [])
        + [f"--examples_per_chunk={args.examples_per_chunk}"]
    )
    env = dict(os.environ)
    if in_tfp_env:
        # The child imports tan_keras.models (plain Keras layers, which Keras 2
        # has too) from this checkout, not from an installed copy.
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return child_result(cmd, f"{model_name}/{method}", env)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="small_cnn,wrn16_4")
    parser.add_argument("--batch_sizes", default="32,64")
    parser.add_argument("--augmults", default="1,4")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--jit", action="store_true", help="jit_compile=True (XLA)")
    parser.add_argument(
        "--repeats", type=int, default=1, help="interleaved runs of each method (median)"
    )
    parser.add_argument(
        "--examples_per_chunk",
        default="auto",
        help="DPKerasModel's examples_per_chunk: 'auto', 'none' or an integer",
    )
    parser.add_argument(
        "--tfp_python",
        default=os.environ.get("TAN_TFP_PYTHON"),
        help="Python of TF Privacy's environment (benchmarks/README.md); "
        "without it the tfp methods are skipped",
    )
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    models = args.models.split(",")
    methods = args.methods.split(",")
    batches = _int_list(parser, "batch_sizes", args.batch_sizes)
    augmults = _int_list(parser, "augmults", args.augmults)
    if "zoo" in models:  # (the zoo's models, in its order, where "zoo" stands)
        at = models.index("zoo")
        models[at : at + 1] = list(zoo.ZOO)
    for name in models:
        if name not in INPUT_SHAPES and name not in zoo.ZOO:
            known = sorted(INPUT_SHAPES) + ["zoo"] + list(zoo.ZOO)
            parser.error(f"--models: unknown model {name!r}; expected one of {known}")
    check_args(parser, args, (("repeats", 1), ("steps", 1), ("warmup", 0)))
    for method in methods:
        if method not in METHODS + (TFP_PLAIN,) or (method == TFP_PLAIN and not args.child):
            parser.error(f"--methods: unknown method {method!r}; expected {METHODS}")
    if args.tfp_python is not None and not os.access(args.tfp_python, os.X_OK):
        parser.error(f"--tfp_python: expected an executable Python; received {args.tfp_python!r}")
    if not args.child and args.tfp_python is None and any(m in TFP_METHODS for m in methods):
        print(
            "tfp, tfp_noxla: skipped (no --tfp_python: TF Privacy needs its own "
            "TensorFlow 2.15 environment, see benchmarks/README.md)",
            flush=True,
        )
        methods = [m for m in methods if m not in TFP_METHODS]
    if not args.child and any(m in TFP_METHODS for m in methods):
        methods = methods + [TFP_PLAIN]

    if args.child:
        result = _measure(
            models[0],
            methods[0],
            batches[0],
            augmults[0],
            args.steps,
            args.warmup,
            args.jit,
            chunk_arg(args.examples_per_chunk),
        )
        print_result(result)
        return

    rows = []
    header = (
        f"{'model':<10} {'B':>4} {'K':>2} {'method':<10} {'ex/s':>9} "
        + " ".join(f"{'vs ' + base:>9}" for base in BASELINES)
        + f" {'peak MB':>8}"
    )
    print(header)
    for name in models:
        for batch in batches:
            for augmult in augmults:
                runs = {method: [] for method in methods}
                for _ in range(args.repeats):
                    for method in methods:
                        result = _run_child(args, name, method, batch, augmult)
                        if result is not None:
                            runs[method].append(result)
                results = {
                    method: {
                        "seconds_per_step": statistics.median(
                            r["seconds_per_step"] for r in method_runs
                        ),
                        "peak_rss_mb": max(r["peak_rss_mb"] for r in method_runs),
                    }
                    for method, method_runs in runs.items()
                    if method_runs
                }
                # Each slowdown is against the plain step of the method's own
                # stack (TF Privacy's environment has its own plain step).
                vs_plain = {}
                for method, result in results.items():
                    own = TFP_PLAIN if method in TFP_METHODS else "plain"
                    if own in results:
                        vs_plain[method] = (
                            result["seconds_per_step"] / results[own]["seconds_per_step"]
                        )
                for method, result in results.items():
                    if method == TFP_PLAIN:
                        continue
                    throughput = batch / result["seconds_per_step"]
                    row = dict(
                        model=name,
                        batch_size=batch,
                        augmult=augmult,
                        method=method,
                        jit=args.jit,
                        repeats=args.repeats,
                        examples_per_s=throughput,
                        peak_rss_mb=result["peak_rss_mb"],
                    )
                    # Ratios are slowdowns: step time relative to the baseline.
                    for base in BASELINES:
                        if method in vs_plain and base in vs_plain:
                            row[f"slowdown_vs_{base}"] = vs_plain[method] / vs_plain[base]
                    rows.append(row)
                    ratios = " ".join(
                        f"{fmt_ratio(row.get('slowdown_vs_' + base)):>9}" for base in BASELINES
                    )
                    print(
                        f"{name:<10} {batch:>4} {augmult:>2} {method:<10} {throughput:>9.1f} "
                        f"{ratios} {row['peak_rss_mb']:>8.0f}",
                        flush=True,
                    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)


def _int_list(parser, flag, text):
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        parser.error(f"--{flag}: expected comma-separated integers >= 1; received {text!r}")
    return values


if __name__ == "__main__":
    main()
