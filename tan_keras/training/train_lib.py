"""The work behind `python -m tan_keras.train`: plain values in, results out.

`train.py` reads the flags, validates them (`train_config`), plans the
privacy (`train_plan`), then calls these functions in order: `build_model`,
`restore_or_start`, `fit`, `evaluate`, `final_metrics`, `write_metrics`. They
take the validated `TrainConfig`, the `PrivacyPlan` and plain values, never
global flags.

Layout of a model_dir (the directory 0700, checkpoint and JSON files 0600):
  train_config.json   the run's resolved settings (compared on --resume)
  checkpoints/        DPCheckpoint files (weights, optimizer, EMA, dp_steps,
                      noise key, sampler key and counter): as secret as the
                      training data, since they hold the noise key; deleted
                      at the end with --delete_checkpoints
  tensorboard/        loss, accuracy, epsilon and eta per Keras epoch
  metrics.json        final metrics (unless --metrics_json says otherwise)
"""

import contextlib
import math
import os
import sys
from typing import Dict, Optional, Tuple

import keras
import tensorflow as tf

from tan_keras import _private_files, _validate, models
from tan_keras.keras_dp import checkpointing
from tan_keras.keras_dp.callbacks import PrivacyAccountant
from tan_keras.keras_dp.dp_model import DPKerasModel, make_private
from tan_keras.mechanism import sampling
from tan_keras.privacy.plan import PrivacyPlan
from tan_keras.training import run_results, train_data, train_plan
from tan_keras.training.train_config import (
    CHECKPOINT_SUBDIR,
    CONFIG_FILE,
    TENSORBOARD_SUBDIR,
    TrainConfig,
)

# Keras epochs (progress bars, TensorBoard points) per run when --eval_every
# is not given.
_EPOCHS_PER_RUN = 10


def make_strategy(name: str, tpu: Optional[str] = None) -> tf.distribute.Strategy:
    """The tf.distribute strategy to train under.

    Under any strategy, DPKerasModel clips per example on each replica, sums
    the clipped gradients across replicas, adds noise of total std sigma*C
    once per logical step (independent streams of std sigma*C/sqrt(R) per
    replica) and divides by the global expected batch size; each global
    micro-batch of P rows is split across the R replicas.

    Args:
      name: "default", "mirrored", "multiworker" or "tpu".
      tpu: TPU name or address for "tpu" (None: the local TPU VM).

    Returns:
      A `tf.distribute.Strategy`.

    Raises:
      ValueError: if `name` is unknown.
    """
    _validate.one_of("strategy", name, ("default", "mirrored", "multiworker", "tpu"))
    keras.backend.clear_session()
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":  # the cluster comes from the TF_CONFIG variable
        return tf.distribute.MultiWorkerMirroredStrategy()
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def physical_batch_size(
    requested: Optional[int], batch_size: int, dataset_size: int, num_replicas: int
) -> int:
    """Rows per global micro-batch: a multiple of the number of replicas.

    Each global micro-batch is split evenly across the replicas (TPUs need
    equal static shapes). The default P = B + 4 sqrt(B(1-q)) is rounded up to
    a multiple of `num_replicas`; an explicit value must already be one.

    Args:
      requested: --physical_batch_size, or None for the default.
      batch_size: B.
      dataset_size: N.
      num_replicas: R, replicas in sync.

    Returns:
      P.

    Raises:
      ValueError: if an explicit P is not a multiple of R.
    """
    if requested is None:
        default = sampling.default_physical_batch_size(batch_size, dataset_size)
        return -(-default // num_replicas) * num_replicas
    if requested % num_replicas:
        raise _validate.invalid(
            "physical_batch_size",
            f"a multiple of the {num_replicas} replicas (each gets an equal share)",
            requested,
        )
    return requested


def build_model(
    config: TrainConfig, plan: PrivacyPlan, input_shape: Tuple[int, ...], num_classes: int
) -> DPKerasModel:
    """Builds and compiles the private model (DP-SGD: SGD on noisy clipped sums).

    Args:
      config: Run settings (model, lr, momentum, ema_decay, l2_norm_clip,
        augmult, seed, noise_seed, jit_compile, examples_per_chunk).
      plan: The privacy plan (sigma, B, N).
      input_shape: (H, W, C) of one image.
      num_classes: Number of classes.

    Returns:
      A compiled `DPKerasModel`.

    Raises:
      ValueError: if the model cannot be built for this input.
    """
    if not tf.distribute.has_strategy():  # never reset state under a strategy scope
        keras.backend.clear_session()
    # Model initialisation and augmentations only; noise and sampling draw
    # from OS entropy unless --noise_seed is given.
    keras.utils.set_random_seed(config.seed)
    model = make_private(
        models.build_model(config.model, input_shape, num_classes),
        noise_seed=config.noise_seed,
        **train_plan.model_settings(config, plan),
    )
    model.compile(
        optimizer=keras.optimizers.SGD(config.lr, momentum=config.momentum),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=config.jit_compile,
    )
    return model


def restore_or_start(
    model_dir: str,
    config: TrainConfig,
    model: DPKerasModel,
    sampler: sampling.PoissonSampler,
) -> checkpointing.DPCheckpoint:
    """Restores the latest checkpoint on --resume; writes train_config.json.

    Nothing is written to model_dir before a resumed checkpoint restored
    successfully.

    Args:
      model_dir: The run directory.
      config: The run settings.
      model: The compiled model.
      sampler: Its Poisson sampler (its counter is rewound to dp_steps).

    Returns:
      The `DPCheckpoint` to keep saving to.

    Raises:
      CheckpointError: if the checkpoint is corrupted or belongs to another DP
        configuration.
    """
    checkpoint = checkpointing.DPCheckpoint(
        os.path.join(model_dir, CHECKPOINT_SUBDIR), model, sampler
    )
    if config.resume:
        steps = checkpoint.restore()
        print(f"Resumed {checkpoint.latest} at dp_steps={steps}.")
    # Owner-only: checkpoints hold the secret keys, logs and metrics hold
    # statistics computed on private examples without noise.
    _private_files.make_private_dir(model_dir)
    run_results.write_json_atomically(os.path.join(model_dir, CONFIG_FILE), config.to_dict())
    return checkpoint


def fit(
    model: DPKerasModel,
    train: tf.data.Dataset,
    sampler: sampling.PoissonSampler,
    checkpoint: checkpointing.DPCheckpoint,
    plan: PrivacyPlan,
    config: TrainConfig,
    model_dir: str,
    test: Optional[tf.data.Dataset] = None,
) -> int:
    """Trains until exactly `plan.steps` noisy updates have been applied.

    One Keras epoch is `--eval_every` updates (else a tenth of the run) worth
    of micro-batches; PrivacyAccountant stops training (and caps it in the
    graph) at S updates, or earlier if the next update would exceed
    --target_eps. Steps that spill into extra micro-batches can make the
    epochs run out first; training then continues with another `fit` whose
    sampler is rewound to dp_steps, so a cut step is redrawn whole.

    Args:
      model: The compiled model.
      train: The endless Poisson dataset of `train_data.train_dataset`.
      sampler: Its sampler.
      checkpoint: Where to save every `config.checkpoint_every` updates.
      plan: The privacy plan (S, sigma, delta, target).
      config: Run settings.
      model_dir: For TensorBoard logs.
      test: Test batches: one batch builds the metrics before training, and
        the whole set is evaluated at every epoch end when --eval_every is set.

    Returns:
      The number of noisy updates applied (`model.dp_steps`).

    Raises:
      RuntimeError: if a whole `fit` applied no update (a bug).
    """
    steps = plan.steps
    per_epoch = config.eval_every or max(1, math.ceil(steps / _EPOCHS_PER_RUN))
    micro_per_step = sampler.steps_padded_to or _micro_batches_per_step(
        plan, sampler.physical_batch_size
    )
    accountant = PrivacyAccountant(
        delta=plan.delta,
        target_epsilon=plan.target_epsilon,
        max_steps=steps,
        accountant=plan.accountant,
    )
    callbacks = [
        accountant,  # First: it adds epsilon/eta to the epoch logs the others read.
        checkpointing.DPCheckpointCallback(checkpoint, every_steps=config.checkpoint_every),
        keras.callbacks.TensorBoard(
            os.path.join(model_dir, TENSORBOARD_SUBDIR), write_graph=False, profile_batch=0
        ),
    ]
    done = int(model.dp_steps.numpy())
    if done < steps and test is not None:
        # Builds the compiled metrics' variables outside the train function
        # (see build_model: no second trace of the train step).
        model.evaluate(test.take(1), verbose=0)
    while done < steps:
        # Batches drawn ahead by an earlier pipeline were never applied.
        sampler.resume_at(int(model.sampling_position.numpy()))
        model.fit(
            train,
            steps_per_epoch=per_epoch * micro_per_step,
            epochs=math.ceil((steps - done) / per_epoch),
            validation_data=test if config.eval_every else None,
            callbacks=callbacks,
            # A live progress bar on a terminal, one line per epoch in a log.
            verbose=1 if sys.stdout.isatty() else 2,
        )
        previous, done = done, int(model.dp_steps.numpy())
        if done < steps and done >= accountant.step_limit:
            print(f"Stopped at dp_steps={done}: one more update would exceed target_eps.")
            break
        if done < steps:
            if done == previous:
                raise RuntimeError(f"fit applied no update at dp_steps={done}.")
            print(f"{steps - done} updates left (steps spilled into extra micro-batches).")
    return done


def _micro_batches_per_step(plan: PrivacyPlan, physical_batch_size: int) -> int:
    # A generous estimate (B + 3 std rows per step): over-estimating only ends
    # the last epoch early, under-estimating needs an extra fit.
    std = math.sqrt(plan.batch_size * (1.0 - plan.sampling_rate))
    return max(1, math.ceil((plan.batch_size + 3.0 * std) / physical_batch_size))


def evaluate(
    model: DPKerasModel,
    test: tf.data.Dataset,
    tta_views: Optional[int] = None,
    augmenter=None,
) -> Dict[str, Optional[float]]:
    """Test accuracy of the final weights, the EMA weights and TTA voting.

    Args:
      model: The trained model.
      test: `(x, y)` test batches.
      tta_views: Views for test-time augmentation voting, or None.
      augmenter: The augmentation for TTA views.

    Returns:
      {"test_accuracy", "test_accuracy_ema" (None without EMA),
      "test_accuracy_tta" (None without TTA; on the EMA weights if any)}.
    """
    results = {
        "test_accuracy": _accuracy(model, test),
        "test_accuracy_ema": None,
        "test_accuracy_tta": None,
    }
    use_ema = model.ema_variables is not None
    if use_ema:
        with model.ema_weights():
            results["test_accuracy_ema"] = _accuracy(model, test)
    if tta_views:
        # The weights reported as the run's result: EMA ones when kept (TAN).
        with model.ema_weights() if use_ema else contextlib.nullcontext():
            results["test_accuracy_tta"] = train_data.tta_accuracy(
                model, test, tta_views, augmenter
            )
    return results


def _accuracy(model: DPKerasModel, test: tf.data.Dataset) -> float:
    return float(model.evaluate(test, verbose=0, return_dict=True)["accuracy"])
