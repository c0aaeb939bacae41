"""DP step against the plain step on Keras's JAX backend (no TensorFlow).

    KERAS_BACKEND=jax python benchmarks/jax_step_benchmark.py --batch_size=64

For each model, the median time of Keras's plain `train_step` on B rows and
of the private `train_step` (tan_keras.jax_dp) on one Poisson step padded as
`fit` pads it (B + 4 std, a multiple of the chunk), both jitted, on the same
device, side by side. Prints one line per model: the DP/plain ratio of the
step times, and per row (the private step's time over its padded rows
against the plain step's over B: the padding's share, large at small B,
left out).

    KERAS_BACKEND=jax python benchmarks/jax_step_benchmark.py --models=zoo
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import zoo  # noqa: E402  (benchmarks/zoo.py)

import tan_keras  # noqa: E402
from tan_keras.jax_dp import poisson_steps  # noqa: E402
from tan_keras.jax_dp.jax_step import training_state  # noqa: E402
from tan_keras.models import cnn, wrn  # noqa: E402

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def text_conv1d_20k():
    """keras.io's text classifier from scratch: 20,000 words, 200 tokens, Conv1D."""
    return keras.Sequential(
        [
            keras.Input((200,), dtype="int32"),
            keras.layers.Embedding(20_000, 128),
            keras.layers.Conv1D(128, 7, strides=3, activation="relu"),
            keras.layers.Conv1D(128, 7, strides=3, activation="relu"),
            keras.layers.GlobalMaxPooling1D(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


MODELS = {
    "small_cnn": lambda: cnn.small_cnn((32, 32, 3), 10),
    "wrn16_4": lambda: wrn.wide_resnet((32, 32, 3), 10, depth=16, width=4),
    "text_conv1d_20k": text_conv1d_20k,
    **{name: entry.build for name, entry in zoo.ZOO.items()},
}


def _inputs(name, leading, rng):
    """Random inputs with leading axes `leading` (rows, or rows and views) for the model."""
    if name in zoo.ZOO:
        return zoo.inputs(name, leading, rng)
    if name == "text_conv1d_20k":
        return rng.integers(0, 20_000, tuple(leading) + (200,)).astype("int32")
    return rng.normal(size=tuple(leading) + (32, 32, 3)).astype("float32")


def _median_seconds(step, state, data, steps, warmup=2):
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        _, state = step(state, data)
        jax.block_until_ready(state)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name, batch_size, augmult, chunk, steps, clippings=("auto",)):
    rng = np.random.default_rng(0)
    dataset_size = 50 * batch_size
    plain = MODELS[name]()
    plain.compile(keras.optimizers.SGD(0.1), LOSS)
    x = _inputs(name, (batch_size,), rng)
    y = rng.integers(0, 10, batch_size).astype("int32")
    plain._symbolic_build(data_batch=(x[:1], y[:1]))
    plain_time = _median_seconds(jax.jit(plain.train_step), training_state(plain), (x, y), steps)

    for clipping in clippings:
        dp_time, rows = _private_step_seconds(
            name, batch_size, dataset_size, augmult, chunk, steps, clipping, rng
        )
        print(
            f"{name:18s} B={batch_size} K={augmult} rows={rows} {clipping:10s} plain "
            f"{plain_time * 1e3:8.1f} ms  DP {dp_time * 1e3:8.1f} ms  "
            f"DP/plain {dp_time / plain_time:5.2f}x  per row "
            f"{dp_time / rows / (plain_time / batch_size):5.2f}x",
            flush=True,
        )


def _private_step_seconds(name, batch_size, dataset_size, augmult, chunk, steps, clipping, rng):
    private = tan_keras.make_private(
        MODELS[name](),
        l2_norm_clip=1.0,
        noise_multiplier=1.0,
        expected_batch_size=batch_size,
        dataset_size=dataset_size,
        augmult=augmult,
        examples_per_chunk=chunk,
        clipping=clipping,
        **zoo.private_kwargs(name),
    )
    private.compile(keras.optimizers.SGD(0.1), LOSS)
    rows = poisson_steps.padded_rows(batch_size, batch_size / dataset_size, chunk)
    px = _inputs(name, (rows, augmult) if augmult > 1 else (rows,), rng)
    py = rng.integers(0, 10, rows).astype("int32")
    keep = np.arange(rows) < batch_size
    step = {"keep": keep, "noise_key": np.tile(np.array([1, 2], np.uint32), (rows, 1))}
    one_view = px[:1, 0] if augmult > 1 else px[:1]
    private._symbolic_build(data_batch=(one_view, py[:1]))
    seconds = _median_seconds(
        jax.jit(private.train_step), training_state(private), (px, py, step), steps
    )
    return seconds, rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        default="small_cnn,strided_cnn",
        help="comma-separated; 'zoo' stands for every model of benchmarks/zoo.py",
    )
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--augmult", type=int, default=1)
    parser.add_argument("--examples_per_chunk", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--clipping",
        default="auto,vectorized",
        help="DPKerasModel clipping routes to time, comma-separated (auto: Dense kernels by "
        "their ghost norms; vectorized: every weight by its per-example gradient).",
    )
    args = parser.parse_args()
    if keras.backend.backend() != "jax":
        raise SystemExit("KERAS_BACKEND must be jax for this benchmark")
    print(f"device: {jax.devices()[0].device_kind}, {jax.device_count()} device(s)")
    names = args.models.split(",")
    if "zoo" in names:  # (the zoo's models, in its order, where "zoo" stands)
        at = names.index("zoo")
        names[at : at + 1] = list(zoo.ZOO)
    for name in names:
        if name not in MODELS:
            raise SystemExit(f"--models: expected names among {sorted(MODELS)}, got {name!r}")
        measure(
            name,
            args.batch_size,
            args.augmult,
            args.examples_per_chunk,
            args.steps,
            args.clipping.split(","),
        )


if __name__ == "__main__":
    main()
