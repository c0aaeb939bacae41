"""One worker of a 2-worker MultiWorkerMirroredStrategy run on localhost.

Usage: python _multiworker_worker.py PORT0 PORT1 INDEX KEY OUT (INDEX "single":
the one-device reference run). With sigma = 0
and clipping on, writes the weights after 3 logical steps (JSON) to OUT.
Workers: 2, each with 1 CPU replica; each draws the same global Poisson
micro-batches (shared sampling key) and keeps half of the rows.
"""

import json
import os
import sys
import warnings

port0, port1, index, key, out = sys.argv[1:6]
SINGLE = index == "single"  # the one-device reference run
if not SINGLE:
    os.environ["TF_CONFIG"] = json.dumps(
        {
            "cluster": {"worker": [f"localhost:{port0}", f"localhost:{port1}"]},
            "task": {"type": "worker", "index": int(index)},
        }
    )

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tan_keras.keras_dp.dp_model import DPKerasModel  # noqa: E402
from tan_keras.mechanism import sampling  # noqa: E402

N, B, P = 64, 8, 8
strategy = tf.distribute.get_strategy() if SINGLE else tf.distribute.MultiWorkerMirroredStrategy()
rng = np.random.default_rng(0)
x = (rng.normal(size=(N, 4)) * 3).astype(np.float32)
y = rng.integers(0, 3, N).astype(np.int32)
with strategy.scope(), warnings.catch_warnings():
    warnings.simplefilter("ignore")
    keras.utils.set_random_seed(0)
    inp = keras.Input((4,))
    model = DPKerasModel(
        inp,
        keras.layers.Dense(3)(keras.layers.Dense(5, activation="tanh")(inp)),
        l2_norm_clip=0.1,
        noise_multiplier=0.0,
        expected_batch_size=B,
        dataset_size=N,
    )
    model.compile(
        optimizer=keras.optimizers.SGD(1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )


def make_sampler():
    return sampling.PoissonSampler(N, B, physical_batch_size=P, secret_key=int(key))


if SINGLE:
    data = sampling.make_poisson_dataset(x, y, make_sampler())
elif os.environ.get("TAN_TEST_BROKEN_SHARDING"):
    if os.environ.get("TAN_TEST_NO_IDENTITY_CHECK"):
        # Without the identity check, to show the bug would change the weights.
        from tan_keras.keras_dp import step_identity

        step_identity.check = lambda *args, **kwargs: tf.constant(0, tf.int64)
    # The bug the test must catch: every host feeds the whole global batch.
    data = strategy.distribute_datasets_from_function(
        lambda context: sampling.make_poisson_dataset(x, y, make_sampler())
    )
    # Passed off as tan_keras's own, as a bug inside the package would.
    sampling._DISTRIBUTED_SAMPLING[data] = (N, B)
else:
    data = sampling.distribute_poisson_dataset(strategy, x, y, make_sampler)
from tan_keras.keras_dp.callbacks import PrivacyAccountant  # noqa: E402

model.fit(
    data,
    epochs=1,
    steps_per_epoch=9,  # 3 logical steps of 3 padded micro-batches (B + 4 std = 19 rows)
    verbose=0,
    callbacks=[PrivacyAccountant(delta=1e-5, max_steps=3)],
)
with open(out, "w") as f:
    json.dump(
        {
            "weights": [w.tolist() for w in model.get_weights()],
            "steps": int(model.dp_steps.numpy()),
        },
        f,
    )
