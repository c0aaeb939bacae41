"""Accelerator check on Keras's JAX backend: DP step speed, noise and sensitivity, no TensorFlow.

The JAX counterpart of `device_check.py`, for machines that have JAX and no
TensorFlow (Colab TPU runtimes, this project's GPU machine):

  KERAS_BACKEND=jax python benchmarks/jax_device_check.py      # WRN-16-4 B 256, K 1 and 4;
                                                               # NF-ResNet-50 B 32, K 8
  KERAS_BACKEND=jax python benchmarks/jax_device_check.py --smoke   # seconds, any CPU

For each configuration it times Keras's plain `train_step` on the B * K
images and the private `train_step` (clipping="auto") on the B examples of
K views, both jitted, in float32 and in mixed_bfloat16; then, on the same
device and precision, it checks what a wrong kernel or a compiler rewrite
could break:

  noise        one step whose clipped sum is zero (every row masked): the
               update is pure noise, its std must be sigma * C * lr / B
               within 3% (about 9e4 draws: 0.24% standard error);
  sensitivity  one example scaled by 1e4 moves the update by at most
               lr * C / B (and by more than half of it: it was used, clipped).

It needs Keras, dp-accounting and this package besides JAX (carried as
wheels where nothing can be installed: README, "Accelerator check"). It
prints one table (and writes JSON with --json) and exits with status 1 if a
check fails.
"""

import os
import sys

import _device_checks

os.environ.setdefault("KERAS_BACKEND", "jax")

CONFIGS = (
    # (model, input shape, expected batch B, views K)
    ("wrn16_4", (32, 32, 3), 256, 1),
    ("wrn16_4", (32, 32, 3), 256, 4),
    ("nf_resnet50", (224, 224, 3), 32, 8),
)
SMOKE_CONFIGS = (("small_cnn", (8, 8, 1), 8, 2),)
_LOSS_NAME = "sparse_categorical_crossentropy"


def _device() -> str:
    import jax

    devices = jax.devices()
    return f"{devices[0].device_kind} x{len(devices)} ({jax.default_backend()})"


def _loss():
    import keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _seconds(step, state, data, steps, warmup) -> float:
    """The median wall time of `step` (`jax_step_benchmark`'s clock)."""
    from jax_step_benchmark import _median_seconds

    return _median_seconds(step, state, data, steps, warmup)


def _private_step(model, x, y, keep):
    """(jitted train_step, its state, its data) of a compiled private model."""
    import jax
    import numpy as np

    from tan_keras.jax_dp.jax_step import training_state

    one_view = x[:1, 0] if model.dp_config.augmult > 1 else x[:1]
    model._symbolic_build(data_batch=(one_view, y[:1]))
    rows = len(y)
    key = np.frombuffer(os.urandom(8), np.uint32)
    step = {
        "keep": np.asarray(keep, bool),
        "noise_key": np.tile(key, (rows, 1)),
        "step": np.zeros(rows, np.int32),
    }
    return jax.jit(model.train_step), training_state(model), (x, y, step)


def time_config(model_name, shape, batch, augmult, precision, steps, warmup) -> dict:
    """Examples per second of the plain and the private step."""
    import jax
    import keras
    import numpy as np

    import tan_keras
    from tan_keras.jax_dp.jax_step import training_state
    from tan_keras.models import build_model

    keras.mixed_precision.set_global_policy(precision)
    try:
        rng = np.random.default_rng(0)
        y = rng.integers(0, 10, batch).astype(np.int32)
        keras.utils.set_random_seed(0)
        plain = build_model(model_name, shape, 10)
        plain.compile(optimizer=keras.optimizers.SGD(0.01), loss=_loss())
        images = rng.random((batch * augmult,) + shape, dtype=np.float32)
        labels = np.repeat(y, augmult)
        plain._symbolic_build(data_batch=(images[:1], labels[:1]))
        plain_s = _seconds(
            jax.jit(plain.train_step), training_state(plain), (images, labels), steps, warmup
        )
        keras.utils.set_random_seed(0)
        private = tan_keras.make_private(
            build_model(model_name, shape, 10),
            l2_norm_clip=1.0,
            noise_multiplier=1.0,
            expected_batch_size=batch,
            dataset_size=50_000,
            augmult=augmult,
            examples_per_chunk=min(32, batch),
        )
        private.compile(optimizer=keras.optimizers.SGD(0.01), loss=_loss())
        x = rng.random((batch, augmult) + shape, dtype=np.float32)
        step, state, data = _private_step(private, x if augmult > 1 else x[:, 0], y, [True] * batch)
        dp_s = _seconds(step, state, data, steps, warmup)
        return {
            "plain_examples_per_s": batch / plain_s,
            "dp_examples_per_s": batch / dp_s,
            "dp_over_plain": dp_s / plain_s,
        }
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _dp_update(width, sigma, clip, batch, x, y, keep, precision):
    """The weights' change after one jitted private step (SGD, lr 1) of a Dense model."""
    import keras
    import numpy as np

    import tan_keras

    keras.mixed_precision.set_global_policy(precision)
    try:
        keras.utils.set_random_seed(3)
        inputs = keras.Input((x.shape[-1],))
        outputs = keras.layers.Activation("linear", dtype="float32")(
            keras.layers.Dense(width)(inputs)
        )
        model = tan_keras.make_private(
            keras.Model(inputs, outputs),
            l2_norm_clip=clip,
            noise_multiplier=sigma,
            expected_batch_size=batch,
            dataset_size=10 * batch,
            examples_per_chunk=len(y),
        )
        model.compile(optimizer=keras.optimizers.SGD(1.0), loss=_loss())
        step, state, data = _private_step(model, x, y, keep)
        _, new_state = step(state, data)
        before = np.concatenate([np.ravel(np.asarray(v)) for v in state[0]])
        after = np.concatenate([np.ravel(np.asarray(v)) for v in new_state[0]])
        return after - before
    finally:
        keras.mixed_precision.set_global_policy("float32")


def check_noise(precision, width=300, sigma=2.0, clip=0.5, batch=50) -> dict:
    """Pure-noise step: update std against sigma * C / B (lr 1)."""
    import numpy as np

    x = np.ones((batch, width), np.float32)
    y = np.zeros(batch, np.int32)
    update = _dp_update(width, sigma, clip, batch, x, y, np.zeros(batch, bool), precision)
    expected = sigma * clip / batch
    measured = float(update.std())
    return {"measured": measured, "expected": expected, "ok": abs(measured / expected - 1) < 0.03}


def check_sensitivity(precision, width=10, clip=0.1, batch=8) -> dict:
    """One example scaled by 1e4 moves the update by at most lr * C / B."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, 6)).astype(np.float32)
    y = rng.integers(0, width, batch).astype(np.int32)
    without = np.arange(batch) < batch - 1
    base = _dp_update(width, 0.0, clip, batch, x, y, without, precision)
    huge = x.copy()
    huge[-1] *= 1e4
    moved = _dp_update(width, 0.0, clip, batch, huge, y, np.ones(batch, bool), precision)
    distance = float(np.linalg.norm(moved - base))
    bound = clip / batch
    # The clipped sum is float32 in either precision, so the bound holds to
    # float32 rounding.
    return {"moved": distance, "bound": bound, "ok": 0.5 * bound < distance <= bound * (1 + 1e-4)}


def main(argv=None) -> int:
    configs, precisions, steps, warmup, json_path = _device_checks.parse(
        __doc__.splitlines()[0], CONFIGS, SMOKE_CONFIGS, 2, argv
    )
    import keras

    if keras.backend.backend() != "jax":
        raise SystemExit(f"KERAS_BACKEND must be jax; Keras runs on {keras.backend.backend()}")

    device = _device()
    print(f"device: {device}", flush=True)
    rows, checks = [], []
    for precision in precisions:
        for model_name, shape, batch, augmult in configs:
            result = time_config(model_name, shape, batch, augmult, precision, steps, warmup)
            rows.append(dict(model=model_name, batch=batch, augmult=augmult, precision=precision))
            rows[-1].update(result)
            print(
                f"| {model_name} | {batch} | {augmult} | {precision} "
                f"| {result['plain_examples_per_s']:.1f} | {result['dp_examples_per_s']:.1f} "
                f"| {result['dp_over_plain']:.2f}x |",
                flush=True,
            )
        checks.append(dict(precision=precision, check="noise", **check_noise(precision)))
        checks.append(
            dict(precision=precision, check="sensitivity", **check_sensitivity(precision))
        )
    print("(columns: model | B | K | precision | plain ex/s | DP ex/s | DP / plain)")
    return _device_checks.report(device, rows, checks, json_path)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
