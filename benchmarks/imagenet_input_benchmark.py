"""Throughput of the ImageNet training input: decoded and augmented views per second per core.

Runs the training program's own input (`train_data.train_dataset` on
`datasets.load_imagenet`: Poisson micro-batches, JPEG bytes read from the
array_record files, each example decoded once and its K views drawn with the
ImageNet policy: reflect-pad 20, random crop 224, flip, colour jitter) on a
synthetic imagenet2012 in TFDS's own format (`tan_keras.data.synthetic_imagenet`,
made on first use), pinned to 1, then 2, ... cores (one child process each,
with CPU affinity and TensorFlow's thread pools set to that many cores).
Prints views/s, views/s per core and the speed-up over one core.

With --backend=jax, the JAX backend's input instead: the Poisson steps its
`fit` draws (`jax_dp.poisson_steps`) from `image_views.AugmentedImages` over
the same lazy views, each example decoded by Pillow and its K views drawn in
numpy (`imagenet_numpy`), loaded by one thread per core; no TensorFlow.

  python benchmarks/imagenet_input_benchmark.py --cores=1,2 --augmult=8
  KERAS_BACKEND=jax python benchmarks/imagenet_input_benchmark.py --backend=jax
"""

import argparse
import json
import os
import sys
import tempfile
import time

from _bench import child_result, print_result


def _measure_jax(args):
    """In the child: views per second of the JAX backend's input on `args.cores` cores."""
    import concurrent.futures

    import numpy as np

    from tan_keras.data import datasets, image_views
    from tan_keras.jax_dp import example_source, poisson_steps

    data = datasets.load_dataset("imagenet2012", args.data_dir)
    source = image_views.AugmentedImages(
        data.train_x, data.train_y, args.augmult, "imagenet", repeated_rows="distinct_people"
    )
    with concurrent.futures.ThreadPoolExecutor(args.cores) as pool:
        steps = poisson_steps.poisson_steps(
            example_source.source_rows(source, pool),
            data.size,
            args.batch / data.size,
            args.batch,
            row_multiple=8,
        )
        for _ in range(args.warmup):
            next(steps)
        views, start = 0, time.perf_counter()
        for _ in range(args.micro_batches):
            x, _, step = next(steps)
            views += int(np.count_nonzero(step["keep"])) * args.augmult
        seconds = time.perf_counter() - start
    assert x.shape[1:] == (args.augmult, 224, 224, 3), x.shape
    return {"cores": args.cores, "views": views, "seconds": seconds, "views_per_s": views / seconds}


def _measure(args):
    """In the child: views per second on `args.cores` cores."""
    os.sched_setaffinity(0, set(range(args.cores)))
    if args.backend == "jax":
        return _measure_jax(args)
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_inter_op_parallelism_threads(args.cores)
    tf.config.threading.set_intra_op_parallelism_threads(args.cores)
    from tan_keras.data import augment, datasets
    from tan_keras.mechanism import sampling
    from tan_keras.training import train_data

    data = datasets.load_dataset("imagenet2012", args.data_dir)
    sampler = sampling.PoissonSampler(
        data.size, args.batch, physical_batch_size=args.physical_batch, seed=0
    )
    augmenter = augment.make_augmenter("imagenet", data.input_shape, seed=0)
    dataset = train_data.train_dataset(data.train_x, data.train_y, sampler, args.augmult, augmenter)
    options = tf.data.Options()
    options.threading.private_threadpool_size = args.cores
    iterator = iter(dataset.with_options(options))
    for _ in range(args.warmup):
        next(iterator)
    views, start = 0, time.perf_counter()
    for _ in range(args.micro_batches):
        x, _, mask, _, _ = next(iterator)
        views += int(np.count_nonzero(mask.numpy())) * args.augmult
    seconds = time.perf_counter() - start
    assert x.shape[1:] == (args.augmult, 224, 224, 3), x.shape
    return {"cores": args.cores, "views": views, "seconds": seconds, "views_per_s": views / seconds}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=None, help="synthetic imagenet2012 (made if absent)")
    parser.add_argument("--examples", type=int, default=2000, help="train images to make")
    parser.add_argument("--cores", default="1,2")
    parser.add_argument("--augmult", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64, help="expected batch B")
    parser.add_argument("--physical_batch", type=int, default=96)
    parser.add_argument("--micro_batches", type=int, default=8, help="timed micro-batches")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--backend", choices=("tensorflow", "jax"), default="tensorflow")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        args.cores = args.child
        print_result(_measure(args))
        return
    try:
        cores = [int(c) for c in args.cores.split(",")]
    except ValueError:
        parser.error(f"--cores: expected integers such as 1,2; got {args.cores!r}")
    available = len(os.sched_getaffinity(0))
    if min(cores) < 1 or max(cores) > available:
        parser.error(f"--cores: expected values in [1, {available}]; got {args.cores!r}")
    if args.backend == "jax":
        # The children (and the synthetic dataset's writer) then use no TensorFlow.
        os.environ["KERAS_BACKEND"] = "jax"
    data_dir = args.data_dir or os.path.join(tempfile.gettempdir(), "tan_keras_synthetic_imagenet")
    if not os.path.isdir(os.path.join(data_dir, "imagenet2012")):
        from tan_keras.data.synthetic_imagenet import make_synthetic_imagenet

        make_synthetic_imagenet(data_dir, train=args.examples, validation=50)
    rows = []
    for count in cores:
        cmd = [sys.executable, __file__, f"--child={count}", f"--data_dir={data_dir}"] + [
            f"--{name}={getattr(args, name)}"
            for name in ("augmult", "batch", "physical_batch", "micro_batches", "warmup", "backend")
        ]
        rows.append(child_result(cmd, f"{count} cores"))
    base = rows[0]["views_per_s"] / rows[0]["cores"]
    print(
        f"ImageNet input ({args.backend}), K = {args.augmult}, synthetic imagenet2012 in {data_dir}"
    )
    print("| cores | views/s | views/s per core | speed-up over 1 core |")
    print("|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['cores']} | {row['views_per_s']:.0f} "
            f"| {row['views_per_s'] / row['cores']:.0f} "
            f"| {row['views_per_s'] / base:.2f}x |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"augmult": args.augmult, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
