"""The training program as a library: `run(config) -> metrics`.

`python -m tan_keras.train` parses its flags into a `TrainConfig` and calls
`run`; the search calls it in process for every grid point. On Keras's JAX
backend the run after the plan is `jax_run.run`'s, without TensorFlow. TensorFlow loads
only after the checks that need no data or model (`train_config`,
`train_plan` and the dataset's availability), so a refused run fails in a
second, with nothing written.
"""

import os
import shutil
import time
from typing import Any, Dict, Optional

from tan_keras import _backend, _startup, _validate
from tan_keras.data import datasets
from tan_keras.training import run_results, train_config, train_plan, training_set
from tan_keras.training.train_config import TrainConfig


def run(config: TrainConfig, start: Optional[float] = None) -> Optional[Dict[str, Any]]:
    """One training run, top to bottom: validate, plan, train, evaluate.

    Prints the privacy plan, the progress and the results; writes
    checkpoints, TensorBoard logs and the metrics JSON under the model_dir.

    Args:
      config: The run's settings.
      start: `time.monotonic()` when the run was asked for (its wall time
        counts from there); None: now.

    Returns:
      The metrics written to the metrics JSON, or None for a dry run.

    Raises:
      ValueError: when the run is refused (a bad setting, an unavailable
        dataset, a checkpoint it must not resume), before anything is written.
      RuntimeError: when training fails after it started.
    """
    start = time.monotonic() if start is None else start
    on_jax = _backend.in_use() == "jax"
    if on_jax:
        from tan_keras.training import jax_run

        jax_run.check_settings(config)
    model_dir = config.model_dir or train_config.default_model_dir(config.dataset, config.model)
    worker = train_config.worker_index() if config.strategy == "multiworker" else 0
    if worker:
        # Workers other than the chief keep their own checkpoints, logs and
        # metrics (identical state: every worker applies the same updates).
        model_dir = os.path.join(model_dir, f"worker_{worker}")
    train_config.check_model_dir(model_dir, config)
    metrics_path = config.metrics_json or os.path.join(model_dir, train_config.METRICS_FILE)
    if os.path.isdir(metrics_path):
        raise _validate.invalid("metrics_json", "a file path, not a directory", metrics_path)
    try:
        data = datasets.load_dataset(config.dataset, config.data_dir)
    except datasets.DatasetUnavailableError:
        if not config.dry_run:
            raise
        # The plan needs N, not the data: a dry run works where the data is
        # not (yet) present, e.g. before preparing ImageNet. Where the data is
        # present, its own N counts (a partial or custom build differs).
        data = datasets.known_facts(config.dataset)
        print(
            f"{config.dataset} is not prepared here: planning with its known N = {data.size}.",
            flush=True,
        )
    # The run's N is its part of any tuning split: the other part is never read.
    data, examples = training_set.choose(config, data)
    plan = train_plan.plan_privacy(
        config, data.size, training_set.reference_dataset_size(config, examples)
    )

    augmenter, where_noiseless_go = None, "printed, and logged to TensorBoard"
    if on_jax:
        jax_run.check_data(config, data)
        where_noiseless_go = "printed"
    else:
        # TensorFlow loads only now, after the checks that need no model.
        _startup.load_tensorflow()
        augmenter = _augmenter(config, data)
    print(
        train_plan.format_plan(
            plan,
            config.dataset,
            training_set.released_noiseless(config),
            examples.describe(),
            where_noiseless_go,
        ),
        flush=True,
    )
    if config.dry_run:
        print(f"dry run: {config.model} on {config.dataset}; nothing trained or written.")
        return None
    if on_jax:
        return jax_run.run(config, data, examples, plan, model_dir, metrics_path, start)
    from tan_keras.mechanism import sampling
    from tan_keras.training import train_data, train_lib

    strategy = train_lib.make_strategy(config.strategy, config.tpu)
    with strategy.scope():
        model = train_lib.build_model(config, plan, data.input_shape, data.num_classes)
    sampler = sampling.PoissonSampler(
        plan.dataset_size,
        plan.batch_size,
        physical_batch_size=train_lib.physical_batch_size(
            config.physical_batch_size,
            plan.batch_size,
            plan.dataset_size,
            strategy.num_replicas_in_sync,
        ),
        seed=config.noise_seed,
        secret_key=(
            train_config.read_sampling_key(config.sampling_key_file)
            if config.sampling_key_file and config.noise_seed is None
            else None
        ),
        # The micro-batches per step (so the updates per Keras epoch printed
        # with epsilon) must not follow the realized batch sizes.
        pad_steps=True,
    )
    # Restores on --resume (refusing corrupted or foreign checkpoints) before
    # writing anything to model_dir.
    checkpoint = train_lib.restore_or_start(model_dir, config, model, sampler)
    print(f"model_dir: {model_dir}", flush=True)

    # From here on, errors are bugs or crashes, not refusals: let them show.
    try:
        train_ds = train_data.train_dataset(
            data.train_x,
            data.train_y,
            sampler,
            config.augmult,
            augmenter,
            per_host=strategy if config.strategy == "multiworker" else None,
        )
        test_ds = train_data.test_dataset(data.test_x, data.test_y, sampler.physical_batch_size)
        dp_steps = train_lib.fit(
            model, train_ds, sampler, checkpoint, plan, config, model_dir, test_ds
        )
        accuracies = train_lib.evaluate(model, test_ds, config.test_augmult, augmenter)
        metrics = run_results.final_metrics(
            config, plan, dp_steps, accuracies, time.monotonic() - start, model_dir, examples
        )
        run_results.write_metrics(metrics_path, metrics)
    except ValueError as err:
        raise RuntimeError(str(err)) from err
    for line in run_results.describe_metrics(metrics):
        print(line)
    print(f"metrics: {metrics_path}", flush=True)
    if config.delete_checkpoints:
        # They hold the noise and sampling keys; a finished run needs none.
        shutil.rmtree(os.path.join(model_dir, train_config.CHECKPOINT_SUBDIR), ignore_errors=True)
        print("checkpoints deleted (--delete_checkpoints).", flush=True)
    return metrics


def _augmenter(config: TrainConfig, data):
    """The TensorFlow augmentation of the run (None for "none").

    Raises:
      ValueError: naming `augment` for a policy that does not fit the images.
    """
    if config.augment == "none":
        return None
    from tan_keras.data import augment

    try:
        return augment.make_augmenter(config.augment, data.input_shape, seed=config.seed)
    except ValueError as err:
        raise _validate.invalid(
            "augment",
            f"a policy that fits {config.dataset} images of shape {data.input_shape}",
            config.augment,
            str(err),
        ) from None
