"""The training program on Keras's JAX backend: `KERAS_BACKEND=jax python -m tan_keras.train`.

The same run as on TensorFlow (the plan, exactly S noisy updates with
Poisson sampling, EMA, the final and EMA test accuracies, the metrics JSON),
with no TensorFlow anywhere: the examples come from a random-access source
that draws each example's K views on the host (`image_views.AugmentedImages`),
the model draws its own Poisson steps from it, and every local device
trains under `keras.distribution.DataParallel` when there are several.

What needs TensorFlow is refused by flag before anything is read or
written: tf.distribute strategies, the debugging noise seed, test-time
augmentation. ImageNet is read by TFDS without TensorFlow and decoded by
Pillow (`imagenet_numpy`), its views drawn in numpy like the others.
Checkpoints are Keras files of the whole
private model (weights, EMA, optimizer state and the privacy ledger; no
secret key exists on this backend: every step draws its noise key from OS
entropy), written every --checkpoint_every updates; --resume continues from
the latest with the count it holds.
"""

import contextlib
import math
import os
import sys
import time
from typing import Any, Dict, Iterator, Optional

import keras
import numpy as np

from tan_keras import _keras_internals, _private_files, _startup, _validate, models
from tan_keras.data import image_views
from tan_keras.jax_dp.wrap import make_private
from tan_keras.keras_dp.callbacks import PrivacyAccountant
from tan_keras.privacy.plan import PrivacyPlan
from tan_keras.training import run_results, train_plan, training_set
from tan_keras.training.train_config import CHECKPOINT_SUBDIR, CONFIG_FILE, TrainConfig

# Settings of the TensorFlow program this backend does not have, each with
# the one value it accepts here and why.
_TENSORFLOW_ONLY = {
    "strategy": ("default", "every local device trains under keras.distribution.DataParallel"),
    "tpu": (None, "tf.distribute's TPU strategy"),
    "sampling_key_file": (None, "multi-worker tf.distribute training"),
    "noise_seed": (None, "noise and batches come from OS entropy only"),
    "test_augmult": (None, "test-time augmentation"),
}
# The checkpoint of a run: the whole private model as one Keras file.
CHECKPOINT_FILE = "latest.keras"
# Test examples per evaluation batch (a multiple of every TPU's core count),
# and per chunk read into memory (ImageNet: 1024 x 224 x 224 x 3 floats, 0.6 GB).
_EVAL_BATCH = 256
_EVAL_CHUNK = 1024


def check_settings(config: TrainConfig) -> None:
    """Refuses, by flag, what the program cannot do on the JAX backend.

    Raises:
      ValueError: naming the flag, the value it takes here and the value given.
    """
    for name, (accepted, why) in _TENSORFLOW_ONLY.items():
        value = getattr(config, name)
        if value != accepted:
            raise _validate.invalid(
                name,
                f"{accepted!r} on the JAX backend ({why}; the other values need the "
                "TensorFlow backend)",
                value,
            )


def check_data(config: TrainConfig, data) -> None:
    """Refuses an augmentation policy that does not fit the images, or needs TensorFlow.

    Raises:
      ValueError: naming `augment`.
    """
    image_views.check_policy(config.augment, data.input_shape)
    _startup.quiet_jax_start()


def run(
    config: TrainConfig,
    data,
    examples: training_set.TrainingSet,
    plan: PrivacyPlan,
    model_dir: str,
    metrics_path: str,
    start: float,
) -> Dict[str, Any]:
    """Trains, evaluates and writes the metrics (`program.run` on the JAX backend).

    Args:
      config: The run's settings (`check_settings` and `check_data` passed,
        the plan printed).
      data: The dataset's arrays (`datasets.ArrayDataset`), the run's part.
      examples: What the run trains on.
      plan: The privacy plan.
      model_dir: The run directory (checked: new, or a run to resume).
      metrics_path: The metrics JSON's path.
      start: `time.monotonic()` when the run was asked for.

    Returns:
      The metrics.

    Raises:
      ValueError: for a checkpoint of another run, before anything is written.
    """
    # Before any variable is made: they are laid out for the distribution.
    with _over_local_devices():
        return _run(config, data, examples, plan, model_dir, metrics_path, start)


def _run(config, data, examples, plan, model_dir, metrics_path, start) -> Dict[str, Any]:
    """`run`, under the distribution it chose."""
    checkpoint_path = os.path.join(model_dir, CHECKPOINT_SUBDIR, CHECKPOINT_FILE)
    if config.resume:
        model = _restored(checkpoint_path, plan, config)
    else:
        model = _built(config, plan, data)
    _private_files.make_private_dir(model_dir)
    run_results.write_json_atomically(os.path.join(model_dir, CONFIG_FILE), config.to_dict())
    print(f"model_dir: {model_dir}", flush=True)
    source = image_views.AugmentedImages(
        data.train_x,
        data.train_y,
        config.augmult,
        config.augment,
        seed=config.seed,
        # ImageNet's images are decoded one at a time, never compared: each
        # index is taken as a different person, as TensorFlow's route does.
        repeated_rows="refuse" if isinstance(data.train_x, np.ndarray) else "distinct_people",
    )
    dp_steps = _fit(model, source, plan, config, checkpoint_path)
    accuracies = _evaluate(model, data.test_x, data.test_y)
    metrics = run_results.final_metrics(
        config, plan, dp_steps, accuracies, time.monotonic() - start, model_dir, examples
    )
    run_results.write_metrics(metrics_path, metrics)
    for line in run_results.describe_metrics(metrics):
        print(line)
    print(f"metrics: {metrics_path}", flush=True)
    if config.delete_checkpoints:
        _remove(checkpoint_path)
        print("checkpoints deleted (--delete_checkpoints).", flush=True)
    return metrics


@contextlib.contextmanager
def _over_local_devices() -> Iterator[None]:
    """Splits every step's rows over all local devices (the TPU's cores), when several.

    A distribution the caller set is kept; the one set here is removed at
    the end (a search runs many programs in one process, and so do tests).
    """
    import jax  # (after Keras: it is the backend's)

    if jax.process_count() > 1:
        # Every process would write the same run directory; the library's
        # fit trains on many hosts (`jax_dp/hosts.py`).
        raise ValueError(
            f"The training program runs in one process (this is one of {jax.process_count()}). "
            "On several hosts, train with DPKerasModel.fit under "
            "keras.distribution.DataParallel() (README, 'Keras on JAX')."
        )
    devices = jax.local_devices()
    given = keras.distribution.distribution()
    if len(devices) > 1 and given is None:
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    where = "keras.distribution.DataParallel" if len(devices) > 1 else "one device"
    print(f"devices: {len(devices)} {devices[0].platform} ({where})", flush=True)
    try:
        yield
    finally:
        keras.distribution.set_distribution(given)


def _built(config: TrainConfig, plan: PrivacyPlan, data) -> keras.Model:
    """The compiled private model of a new run."""
    # Initialisation only: the noise and the batches come from OS entropy.
    _keras_internals.set_random_seed_without_tensorflow(config.seed)
    model = make_private(
        models.build_model(config.model, data.input_shape, data.num_classes),
        **train_plan.model_settings(config, plan),
    )
    model.compile(
        optimizer=keras.optimizers.SGD(config.lr, momentum=config.momentum),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def _restored(checkpoint_path: str, plan: PrivacyPlan, config: TrainConfig) -> keras.Model:
    """The private model of the checkpoint to resume, checked against the plan.

    Raises:
      ValueError: naming the setting of the checkpoint's model that differs
        from the run's.
    """
    # (Its presence was checked with the model_dir: `train_config.check_model_dir`.)
    model = keras.saving.load_model(checkpoint_path)
    dp = model.dp_config
    # The checkpoint must be this run's: a file of another run (other
    # settings) would continue another mechanism under this plan's epsilon.
    planned = dict(
        noise_multiplier=plan.noise_multiplier,
        expected_batch_size=plan.batch_size,
        dataset_size=plan.dataset_size,
        l2_norm_clip=config.l2_norm_clip,
        augmult=config.augmult,
        clipped_fraction_std=plan.clipped_fraction_std,
    )
    saved = {name: getattr(dp, name) for name in planned}
    saved_ema = model.ema_decay
    for name, value in list(planned.items()) + [("ema_decay", config.ema_decay)]:
        found = saved_ema if name == "ema_decay" else saved[name]
        if found != value:
            raise _validate.invalid(
                name,
                f"{found!r}, the value of the checkpoint in {checkpoint_path}, when resuming it",
                value,
            )
    print(f"Resumed {checkpoint_path} at dp_steps={int(model.dp_steps)}.", flush=True)
    return model


class _Checkpoint(keras.callbacks.Callback):
    """Writes the whole private model every `every` updates, atomically."""

    def __init__(self, path: str, every: int):
        super().__init__()
        self._path, self._every = path, every

    def on_train_batch_end(self, batch, logs=None):
        # The ledger's count is advanced by the model's first callback.
        if int(self.model.dp_steps) % self._every == 0:
            self.save()

    def save(self):
        os.makedirs(os.path.dirname(self._path), mode=0o700, exist_ok=True)
        tmp = f"{self._path[: -len('.keras')]}.tmp-{os.getpid()}.keras"
        self.model.save(tmp)
        os.chmod(tmp, 0o600)
        os.replace(tmp, self._path)


def _fit(model, source, plan: PrivacyPlan, config: TrainConfig, checkpoint_path: str) -> int:
    """Trains until `plan.steps` noisy updates (or the budget); returns `dp_steps`."""
    done = int(model.dp_steps)
    if done < plan.steps:
        per_epoch = max(1, int(math.floor(plan.dataset_size / plan.batch_size + 0.5)))
        accountant = PrivacyAccountant(
            delta=plan.delta,
            target_epsilon=plan.target_epsilon,
            max_steps=plan.steps,
            accountant=plan.accountant,
        )
        checkpoint = _Checkpoint(checkpoint_path, config.checkpoint_every)
        model.fit(
            source,
            epochs=math.ceil((plan.steps - done) / per_epoch),
            # First: it adds epsilon and eta to the epoch logs the others read.
            callbacks=[accountant, checkpoint],
            verbose=1 if sys.stdout.isatty() else 2,
        )
        checkpoint.save()
    done = int(model.dp_steps)
    if done < plan.steps:
        print(f"Stopped at dp_steps={done}: one more update would exceed target_eps.")
    return done


def _evaluate(model, test_x, test_y) -> Dict[str, Optional[float]]:
    """Test accuracy of the final weights and of the EMA weights (None without EMA).

    The test images are read a chunk at a time (ImageNet's are decoded on
    access: the whole split would not fit in memory), each chunk scored by
    both weights.
    """
    hits = {"test_accuracy": 0, "test_accuracy_ema": 0}
    total = len(test_y)
    for start in range(0, total, _EVAL_CHUNK):
        images = np.asarray(test_x[start : start + _EVAL_CHUNK], np.float32)
        labels = np.asarray(test_y[start : start + _EVAL_CHUNK]).reshape(-1)
        # Padded to whole batches: under DataParallel every batch must split
        # evenly over the devices (a last batch of 104 rows on 8 cores would not).
        padded = np.concatenate(
            [images, np.zeros((-len(images) % _EVAL_BATCH,) + images.shape[1:], np.float32)]
        )

        hits["test_accuracy"] += _correct(model, padded, labels)
        if model.ema_decay is not None:
            with model.ema_weights():
                hits["test_accuracy_ema"] += _correct(model, padded, labels)
    return {
        "test_accuracy": hits["test_accuracy"] / total,
        "test_accuracy_ema": (
            hits["test_accuracy_ema"] / total if model.ema_decay is not None else None
        ),
        "test_accuracy_tta": None,
    }


def _correct(model, padded: np.ndarray, labels: np.ndarray) -> int:
    """How many of the first len(labels) images the model classifies right."""
    logits = model.predict(padded, batch_size=_EVAL_BATCH, verbose=0)
    return int(np.sum(np.argmax(logits[: len(labels)], axis=-1) == labels))


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
