"""Accelerator check: DP step speed against the plain step, noise and sensitivity, with XLA.

Run it on a machine with a GPU (or TPU host) to see what the DP step costs
there and that its guarantees hold under XLA and bfloat16:

  python benchmarks/device_check.py                  # WRN-16-4 B 256, K 1 and 4;
                                                     # NF-ResNet-50 B 32, K 8
  python benchmarks/device_check.py --smoke          # seconds, on any CPU (tests)

For each configuration it times the plain Keras train step and the
DPKerasModel step (clipping="auto", which picks the route for XLA) on the
same model and random data, both compiled with XLA (`jit_compile=True`), in
float32 and in mixed_bfloat16; then, on the same device and settings, it
checks the two properties a wrong kernel or a compiler rewrite could break:

  noise    one step whose clipped sum is zero (every row masked): the update
           is pure noise, its std must be sigma * C * lr / B within 3%
           (about 9e4 draws: 0.24% standard error);
  sensitivity  one example scaled by 1e4 moves the update by at most
           lr * C / B (and by more than half of it: it was used, clipped).

It prints one table (and writes JSON with --json) and exits with status 1 if
a check fails.
"""

import sys

import _device_checks
from _bench import keras_train_step, median_seconds

CONFIGS = (
    # (model, input shape, physical batch B, views K)
    ("wrn16_4", (32, 32, 3), 256, 1),
    ("wrn16_4", (32, 32, 3), 256, 4),
    ("nf_resnet50", (224, 224, 3), 32, 8),
)
SMOKE_CONFIGS = (("small_cnn", (8, 8, 1), 8, 2),)


def _device():
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "CPU only (no accelerator found)"
    names = [tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus]
    return ", ".join(names)


def time_config(model_name, shape, batch, augmult, precision, steps, warmup):
    """Examples per second of the plain and the DP step, and the DP route."""
    import keras
    import numpy as np

    from tan_keras.keras_dp.dp_model import make_private
    from tan_keras.models import build_model

    keras.mixed_precision.set_global_policy(precision)
    try:
        rng = np.random.default_rng(0)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        y = rng.integers(0, 10, batch).astype(np.int32)
        keras.utils.set_random_seed(0)
        plain = build_model(model_name, shape, 10)
        plain.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss, jit_compile=True)
        x_plain = rng.random((batch * augmult,) + shape, dtype=np.float32)
        plain_data = (x_plain, np.repeat(y, augmult))
        plain_s = median_seconds(keras_train_step(plain, plain_data), steps, warmup)
        keras.utils.set_random_seed(0)
        dp = make_private(
            build_model(model_name, shape, 10),
            l2_norm_clip=1.0,
            noise_multiplier=1.0,
            expected_batch_size=batch,
            dataset_size=50_000,
            augmult=augmult,
        )
        dp.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss, jit_compile=True)
        x = rng.random((batch, augmult) + shape, dtype=np.float32)
        data = (x if augmult > 1 else x[:, 0], y, np.ones(batch, np.float32), np.ones(batch, bool))
        dp_s = median_seconds(keras_train_step(dp, data), steps, warmup)
        return {
            "plain_examples_per_s": batch / plain_s,
            "dp_examples_per_s": batch / dp_s,
            "dp_over_plain": dp_s / plain_s,
            "route": dp.clipping,
        }
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _dp_update(width, sigma, clip, batch, x, y, mask, precision):
    """The weights' change after one XLA-compiled DP step (SGD, lr 1)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from tan_keras.keras_dp.dp_model import DPKerasModel
    from tan_keras.mechanism import content_digest, sampling

    keras.mixed_precision.set_global_policy(precision)
    try:
        keras.utils.set_random_seed(3)
        inp = keras.Input((x.shape[-1],))
        out = keras.layers.Dense(width)(inp)
        model = DPKerasModel(
            inp,
            keras.layers.Activation("linear", dtype="float32")(out),
            l2_norm_clip=clip,
            noise_multiplier=sigma,
            expected_batch_size=batch,
            dataset_size=10 * batch,
        )
        model.compile(
            optimizer=keras.optimizers.SGD(1.0),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=True,
        )
        start = np.concatenate([v.numpy().ravel() for v in model.trainable_variables])
        identity = content_digest._seal(
            (x, y, mask), sampling.identity_rows(0, 0, 1, 10 * batch, batch, 0, len(y))
        )
        element = (x, y, mask, np.ones(len(y), bool), identity)
        data = tf.data.Dataset.from_tensors(element)
        model.fit(data, verbose=0)
        end = np.concatenate([v.numpy().ravel() for v in model.trainable_variables])
        return end - start
    finally:
        keras.mixed_precision.set_global_policy("float32")


def check_noise(precision, width=300, sigma=2.0, clip=0.5, batch=50):
    """Pure-noise step: update std against sigma * C / B (lr 1)."""
    import numpy as np

    x = np.ones((batch, width), np.float32)
    y = np.zeros(batch, np.int32)
    update = _dp_update(width, sigma, clip, batch, x, y, np.zeros(batch, np.float32), precision)
    expected = sigma * clip / batch
    measured = float(update.std())
    return {
        "measured": measured,
        "expected": expected,
        "ok": abs(measured / expected - 1) < 0.03,
    }


def check_sensitivity(precision, width=10, clip=0.1, batch=8):
    """One example scaled by 1e4 moves the update by at most lr * C / B."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, 6)).astype(np.float32)
    y = rng.integers(0, width, batch).astype(np.int32)
    without = np.r_[np.ones(batch - 1), 0.0].astype(np.float32)
    base = _dp_update(width, 0.0, clip, batch, x, y, without, precision)
    huge = x.copy()
    huge[-1] *= 1e4
    moved = _dp_update(width, 0.0, clip, batch, huge, y, np.ones(batch, np.float32), precision)
    distance = float(np.linalg.norm(moved - base))
    bound = clip / batch
    # bfloat16 computes the forward pass in 8-bit mantissas; the clipped sum
    # is float32 (precision.py), so the bound holds to float32 rounding.
    return {
        "moved": distance,
        "bound": bound,
        "ok": 0.5 * bound < distance <= bound * (1 + 1e-4),
    }


def main(argv=None):
    configs, precisions, steps, warmup, json_path = _device_checks.parse(
        __doc__.splitlines()[0], CONFIGS, SMOKE_CONFIGS, 3, argv
    )
    device = _device()
    print(f"device: {device}", flush=True)
    rows, checks = [], []
    for precision in precisions:
        for model_name, shape, batch, augmult in configs:
            result = time_config(model_name, shape, batch, augmult, precision, steps, warmup)
            rows.append(dict(model=model_name, batch=batch, augmult=augmult, precision=precision))
            rows[-1].update(result)
        checks.append(dict(precision=precision, check="noise", **check_noise(precision)))
        checks.append(
            dict(precision=precision, check="sensitivity", **check_sensitivity(precision))
        )

    print(
        "| model | B | K | precision | DP route (auto, XLA) | plain ex/s | DP ex/s | DP / plain |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['batch']} | {r['augmult']} | {r['precision']} | {r['route']} "
            f"| {r['plain_examples_per_s']:.1f} | {r['dp_examples_per_s']:.1f} "
            f"| {r['dp_over_plain']:.2f}x |"
        )
    return _device_checks.report(device, rows, checks, json_path)


if __name__ == "__main__":
    sys.exit(main())
