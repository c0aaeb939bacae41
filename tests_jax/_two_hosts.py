"""One process of a private run under `jax.distributed` (run by multi_host_test.py).

    python _two_hosts.py PROCESS_ID PROCESSES PORT OUT_DIR NOISE[,NOISE...] [SECRET,...]

For each noise multiplier, trains the same model from the same weights.
With PROCESSES > 1, joins the run at 127.0.0.1:PORT over Gloo and trains under
`keras.distribution.DataParallel()` over every process's devices; with 1, it
is the one-device reference, replaying the SECRETs (the multi-host run's).
Writes OUT_DIR/process_<id>_<run>.npz: the secret the run drew from, the
final weights, the examples it loaded at each step and the updates counted.
"""

import os
import sys

os.environ["KERAS_BACKEND"] = "jax"

import jax  # noqa: E402

PROCESS_ID, PROCESSES, PORT = (int(a) for a in sys.argv[1:4])
OUT_DIR, NOISES = sys.argv[4], [float(n) for n in sys.argv[5].split(",")]
SECRETS = [int(s) for s in sys.argv[6].split(",")] if len(sys.argv) > 6 else None
ROWS, BATCH, EPOCHS = 48, 16, 1

if PROCESSES > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tan_keras  # noqa: E402
from tan_keras.jax_dp import example_source, hosts, jax_step  # noqa: E402
from tan_keras.training import jax_run  # noqa: E402


class Examples:
    """A source over fixed images (loaded by index, as a host loads its share)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        return self.x[index], self.y[index]


def record_steps(loaded):
    """Records the indices of every step's rows this process loads."""
    source_rows = example_source.source_rows

    def recording(source, pool=None):
        rows = source_rows(source, pool)

        def recorded(indices, count):
            loaded.append(np.asarray(indices))
            return rows(indices, count)

        return recorded

    example_source.source_rows = recording


def main():
    refusals = []
    if PROCESSES > 1:
        keras.distribution.initialize(f"127.0.0.1:{PORT}", PROCESSES, PROCESS_ID)
        for distribution in (None, keras.distribution.DataParallel(devices=jax.local_devices())):
            # Each process alone would train a model of its own.
            keras.distribution.set_distribution(distribution)
            try:
                jax_step.data_parallel()
            except ValueError as error:
                refusals.append(str(error))
        keras.distribution.set_distribution(None)
        try:
            with jax_run._over_local_devices():
                pass
        except ValueError as error:
            refusals.append(str(error))
        keras.distribution.set_distribution(keras.distribution.DataParallel())
        # The same arrays in both processes pass; a shard of each its own is refused.
        x, y = np.arange(12, dtype="float32").reshape(6, 2), np.zeros(6, "int32")
        hosts.check_same_examples(x, y)
        try:
            hosts.check_same_examples(x + PROCESS_ID, y)
        except ValueError as error:
            refusals.append(str(error))
    secrets_drawn = []
    shared_secret = hosts.shared_secret

    def recorded_secret():
        value = shared_secret() if SECRETS is None else SECRETS[len(secrets_drawn)]
        secrets_drawn.append(value)
        return value

    hosts.shared_secret = recorded_secret
    loaded = []
    record_steps(loaded)
    for run, noise in enumerate(NOISES):
        loaded.clear()
        train(noise, loaded, secrets_drawn, run, refusals)


def train(noise, loaded, secrets_drawn, run, refusals):
    keras.utils.set_random_seed(3)  # the same initial weights everywhere
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 4, ROWS).astype("int32")
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(6, 3, strides=2, activation="relu"),
            keras.layers.Conv2D(6, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(4),
        ]
    )
    private = tan_keras.make_private(
        model,
        l2_norm_clip=0.5,
        noise_multiplier=noise,
        expected_batch_size=BATCH,
        dataset_size=ROWS,
        examples_per_chunk=4,
    )
    private.compile(
        keras.optimizers.SGD(0.5), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    private.fit(Examples(x, y), epochs=EPOCHS, verbose=0, repeated_rows="distinct_people")
    weights = [np.asarray(w) for w in model.get_weights()]
    np.savez(
        os.path.join(OUT_DIR, f"process_{PROCESS_ID}_{run}.npz"),
        secret=np.array([str(secrets_drawn[run])]),
        loaded=np.concatenate(loaded).astype(np.int64),
        loaded_per_step=np.array([len(step) for step in loaded]),
        dp_steps=np.array(int(private.dp_steps)),
        devices=np.array(len(jax.devices())),
        refusals=np.array(refusals, dtype=str),
        **{f"w{i}": w for i, w in enumerate(weights)},
    )


if __name__ == "__main__":
    main()
