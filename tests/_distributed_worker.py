"""Runs DP training under MirroredStrategy on R logical CPU devices.

Usage: python _distributed_worker.py R VARIANT. Prints one JSON line. Run in a
subprocess: the logical devices must be configured before TensorFlow starts.
VARIANT "correct" is the package as shipped; "same_seed" (every replica draws
the same noise) and "full_noise" (every replica adds noise of std sigma*C)
are deliberately broken implementations for the power checks.
"""

import contextlib
import json
import math
import sys
import warnings

import keras
import numpy as np
import tensorflow as tf

R, VARIANT = int(sys.argv[1]), sys.argv[2]
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * R)

from _helpers import identities, sealed  # noqa: E402

from tan_keras.keras_dp.callbacks import PrivacyAccountant  # noqa: E402
from tan_keras.keras_dp.dp_model import DPKerasModel  # noqa: E402
from tan_keras.mechanism import noise, sampling  # noqa: E402

if VARIANT == "same_seed":
    original_seed = noise.step_seed
    noise.step_seed = lambda key, step, replica_id=0: original_seed(key, step, 0)
elif VARIANT == "full_noise":
    original_add = noise.add_gaussian_noise
    noise.add_gaussian_noise = lambda g, std, seed: original_add(g, std * math.sqrt(R), seed)
elif VARIANT == "reg_every_replica":
    # Each replica adds the whole penalty gradient (the shipped bug): R times.
    def _regularized(self, grads, variables):
        if not self.losses:
            return grads
        with tf.GradientTape() as tape:
            penalty = tf.add_n(self.losses)
        reg = tape.gradient(penalty, [v.value for v in variables], unconnected_gradients="zero")
        return [g + r for g, r in zip(grads, reg)]

    DPKerasModel._add_weight_regularization = _regularized

strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(R)])
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
P, B, N = 8, 8, 64  # physical rows per micro-batch (divisible by 4), expected batch
BASE_DP = dict(l2_norm_clip=1.0, noise_multiplier=0.0, expected_batch_size=B, dataset_size=N)


def build(
    width,
    sigma,
    clip,
    input_dim,
    examples_per_chunk="auto",
    regularizer=None,
    optimizer=None,
    distributed=True,
):
    scope = strategy.scope() if distributed else contextlib.nullcontext()
    with scope, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        keras.utils.set_random_seed(0)
        inp = keras.Input((input_dim,))
        hidden = keras.layers.Dense(width, activation="tanh", kernel_regularizer=regularizer)(inp)
        model = DPKerasModel(
            inp,
            keras.layers.Dense(3)(hidden),
            l2_norm_clip=clip,
            noise_multiplier=sigma,
            expected_batch_size=B,
            dataset_size=N,
            examples_per_chunk=examples_per_chunk,
        )
        # Made in the scope: an optimizer's own variables belong to its strategy.
        model.compile(optimizer=optimizer() if optimizer else keras.optimizers.SGD(1.0), loss=LOSS)
    return model


def dataset(model, x, y, mask, steps, micro):
    """`steps` logical steps of `micro` micro-batches of P rows each, the next ones of `model`."""
    ends = np.tile(np.arange(micro) == micro - 1, steps)
    return sealed(
        tf.data.Dataset.from_tensor_slices(
            (
                x.reshape(-1, P, x.shape[-1]).astype(np.float32),
                y.reshape(-1, P).astype(np.int32),
                mask.reshape(-1, P).astype(np.float32),
                np.repeat(ends[:, None], P, axis=1),
                identities(model, ends, P),
            )
        )
    )


def adam_run(distributed):
    """A stateful optimizer: Adam, 3 logical steps of 2 micro-batches.

    On micro-batches that end no logical step the gated update must put back
    Adam's moments and iteration count too. VARIANT "adam_no_strategy" runs
    it without any strategy (the ungated one-device path, the reference), in
    a process of its own: Keras's global seed state must not be shared
    across strategies.
    """
    model = build(
        5,
        sigma=0.0,
        clip=0.1,
        input_dim=4,
        optimizer=lambda: keras.optimizers.Adam(0.05),
        distributed=distributed,
    )
    model.fit(dataset(model, x, y, np.ones(48), steps=3, micro=2), verbose=0)
    return {
        "weights_adam": [w.tolist() for w in model.get_weights()],
        "adam_iterations": int(model.optimizer.iterations.numpy()),
    }


result = {}
rng = np.random.default_rng(0)

# 1. Clipping on, no noise: 3 logical steps of 2 micro-batches.
x = rng.normal(size=(48, 4)) * 3
y = rng.integers(0, 3, 48)
if VARIANT == "adam_no_strategy":
    print("RESULT " + json.dumps(adam_run(distributed=False)))
    sys.exit(0)
# The deliberately broken variants run only what their power checks read
# (the noise, the penalty and the replicas' draws: sections 2, 2b and 3).
ALL_SECTIONS = VARIANT == "correct"
if ALL_SECTIONS:
    model = build(5, sigma=0.0, clip=0.1, input_dim=4)
    accountant = PrivacyAccountant(delta=1e-5)
    model.fit(
        dataset(model, x, y, np.ones(48), steps=3, micro=2), verbose=0, callbacks=[accountant]
    )
    result["weights"] = [w.tolist() for w in model.get_weights()]
    result["dp_steps"] = int(model.dp_steps.numpy())
    # Restoring weights under the strategy does not rewind the ledger.
    model.set_weights([np.zeros_like(w) for w in model.get_weights()])
    result["dp_steps_after_set_weights"] = int(model.dp_steps.numpy())
    # The same with chunked clipping: each replica clips its rows one at a time.
    model = build(5, sigma=0.0, clip=0.1, input_dim=4, examples_per_chunk=1)
    initial = model.get_weights()
    model.fit(dataset(model, x, y, np.ones(48), steps=3, micro=2), verbose=0)
    result["weights_chunked"] = [w.tolist() for w in model.get_weights()]
    result["chunked_moved"] = max(
        float(np.abs(a - b).max()) for a, b in zip(model.get_weights(), initial)
    )

    # 1b. The same steps with Adam (see adam_run).
    result.update(adam_run(distributed=True))
    # 1c. Optimizer-side clipping: Keras clips each replica's partial gradient
    # before the all-reduce, a function of partial sums that carry only
    # sigma*C/sqrt(R) of noise each: refused with several replicas.
    try:
        build(
            5,
            sigma=0.0,
            clip=0.1,
            input_dim=4,
            optimizer=lambda: keras.optimizers.Adam(0.05, global_clipnorm=0.01),
        )
        result["optimizer_clipping_refused"] = False
    except ValueError as err:
        result["optimizer_clipping_refused"] = "global_clipnorm" in str(err)
    # 1d. The same option set after compile is refused by fit, before any step.
    model = build(5, sigma=0.0, clip=0.1, input_dim=4)
    model.optimizer.clipnorm = 0.01
    before = [w.copy() for w in model.get_weights()]
    try:
        model.fit(dataset(model, np.ones((P, 4)), np.zeros(P), np.ones(P), 1, 1), verbose=0)
        result["late_clipnorm_refused"] = False
    except ValueError as err:
        result["late_clipnorm_refused"] = "clipnorm" in str(err)
    result["late_clipnorm_untouched"] = all(
        np.array_equal(a, b) for a, b in zip(before, model.get_weights())
    )

# 2. Pure noise (all rows masked): one step on a 300x300 layer (~9e4 params).
model = build(300, sigma=2.0, clip=0.5, input_dim=300)
start = np.concatenate([v.numpy().ravel() for v in model.trainable_variables])
model.fit(dataset(model, np.zeros((P, 300)), np.zeros(P), np.zeros(P), 1, 1), verbose=0)
end = np.concatenate([v.numpy().ravel() for v in model.trainable_variables])
result["noise_std"] = float((end - start).std())
result["expected_std"] = 2.0 * 0.5 / B

# 2b. A weight penalty, no data (all rows masked), no noise: the update is
# -lr * grad(penalty), applied once whatever the number of replicas.
model = build(5, sigma=0.0, clip=1.0, input_dim=4, regularizer=keras.regularizers.L2(0.5))
kernel = model.trainable_variables[0]
before = kernel.numpy()
model.fit(dataset(model, np.ones((P, 4)), np.zeros(P), np.zeros(P), 1, 1), verbose=0)
result["reg_update"] = float(np.abs(kernel.numpy() - before).max())
result["reg_expected"] = float(np.abs(1.0 * 0.5 * 2 * before).max())

if ALL_SECTIONS:
    # 2c. An out-of-range label is dropped and counted on every replica count.
    model = build(5, sigma=0.0, clip=1.0, input_dim=4)
    labels = np.zeros(P)
    labels[[1, 6]] = [9, -1]
    history = model.fit(dataset(model, np.ones((P, 4)), labels, np.ones(P), 1, 1), verbose=0)
    result["invalid_labels_counted"] = float(history.history["nonfinite_examples"][-1])

    # 2e. Two inputs and two outputs (dicts), per-host Poisson input built from
    # dicts of arrays: the weights must not depend on the number of replicas.
    rng = np.random.default_rng(3)
    features = {"a": rng.normal(size=(N, 3)), "b": rng.normal(size=(N, 2))}
    features = {k: v.astype(np.float32) for k, v in features.items()}
    targets = {"cls": rng.integers(0, 3, N).astype(np.int32), "reg": features["b"][:, :1]}
    with strategy.scope():
        keras.utils.set_random_seed(0)
        a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
        h = keras.layers.Dense(6, activation="tanh")(keras.layers.Concatenate()([a, b]))
        heads = {"cls": keras.layers.Dense(3)(h), "reg": keras.layers.Dense(1)(h)}
        model = DPKerasModel({"a": a, "b": b}, heads, **BASE_DP)
        model.compile(
            optimizer=keras.optimizers.SGD(0.5),
            loss={"cls": LOSS, "reg": "mse"},
            loss_weights={"reg": 0.5},
        )
    structured = sampling.distribute_poisson_dataset(
        strategy,
        features,
        targets,
        # A fixed key: every run of this test draws the same batches.
        lambda: sampling.PoissonSampler(N, B, physical_batch_size=16, secret_key=12345),
    )
    model.fit(structured, steps_per_epoch=3, verbose=0)
    result["structured_weights"] = [w.tolist() for w in model.get_weights()]
    result["structured_steps"] = int(model.dp_steps.numpy())

    # 2d. The model checks hold when the model is built under the strategy.
    class _Running(keras.layers.Layer):
        def build(self, shape):
            self.running = self.add_weight(
                name="running", shape=shape[-1:], initializer="zeros", trainable=False
            )

        def call(self, x, training=None):
            if training:
                self.running.assign(tf.reduce_mean(x, 0))
            return x

    with strategy.scope():
        inp = keras.Input((4,))
        try:
            DPKerasModel(inp, keras.layers.Dense(3)(_Running()(inp)), **BASE_DP)
            result["state_write_refused"] = False
        except ValueError as err:
            result["state_write_refused"] = "writes the variable" in str(err) and "running" in str(
                err
            )
        encoder = keras.layers.Dense(16)
        hidden = encoder(inp)
        decoded = keras.layers.Lambda(lambda h: tf.matmul(h, encoder.kernel, transpose_b=True))(
            hidden
        )
        tied = DPKerasModel(inp, keras.layers.Dense(3)(decoded), **BASE_DP)
        tied.compile(optimizer=keras.optimizers.SGD(1.0), loss=LOSS)
    result["tied_kernel_ghosted"] = any(layer is encoder for layer in tied._ghost_layers)

# 2f. A noisy clipped fraction, release_train_metrics=False (R = 2 only: the
# code path is the same for any R > 1). C is tiny, so a step's true count is
# its number of real rows; each replica counts and noises its half.
if R == 2 and VARIANT == "correct":
    steps, micro = 100, 2
    rng = np.random.default_rng(4)
    real = rng.integers(0, P + 1, steps * micro)
    rows = (np.arange(P)[None] < real[:, None]).astype(np.float32).ravel()
    xs, ys = rng.normal(size=(steps * micro * P, 4)), rng.integers(0, 3, steps * micro * P)
    with strategy.scope(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inp = keras.Input((4,))
        model = DPKerasModel(
            inp,
            keras.layers.Dense(3)(inp),
            **{**BASE_DP, "l2_norm_clip": 1e-6, "noise_multiplier": 1.0},
            clipped_fraction_std=0.1,
            release_train_metrics=False,
            noise_seed=3,
        )
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS, metrics=["accuracy"])
    batch_logs = []
    recorder = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: batch_logs.append(dict(logs))
    )
    history = model.fit(
        dataset(model, xs, ys, rows, steps, micro),
        verbose=0,
        callbacks=[recorder],
        validation_data=(xs[:P].astype(np.float32), ys[:P]),
    )
    result["fraction_running_means"] = [
        float(logs["noisy_clipped_fraction"]) for logs in batch_logs[micro - 1 :: micro]
    ]
    result["fraction_truth"] = (real.reshape(steps, micro).sum(axis=1) / B).tolist()
    result["fraction_epoch_log"] = history.history["noisy_clipped_fraction"][-1]
    result["fraction_log_keys"] = sorted(set(history.history).union(*batch_logs))

# 3. Each replica's own noise draw, for the correlation check.
key = tf.constant(noise.make_noise_key(), tf.int64)


def replica_noise():
    ctx = tf.distribute.get_replica_context()
    seed = noise.step_seed(key, 0, ctx.replica_id_in_sync_group)
    return noise.add_gaussian_noise([tf.zeros([4000])], 1.0, seed)[0]


per_replica = strategy.experimental_local_results(strategy.run(replica_noise))
result["replica_noise"] = [v.numpy().tolist() for v in per_replica]
print("RESULT " + json.dumps(result))
