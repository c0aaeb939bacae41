"""What the benchmark scripts share: timing, child processes, argument checks.

Standard library only at import: `dp_step_benchmark.py` also runs in TF
Privacy's environment (TensorFlow 2.15, Keras 2). A script run as
`python benchmarks/<script>.py` finds this module next to it.
"""

import json
import os
import resource
import statistics
import subprocess
import time

_RESULT = "RESULT "


def median_seconds(step, steps, warmup):
    """Median wall time of `step()` over `steps` calls, after `warmup` untimed ones.

    `step` must return only once its work is done (e.g. by reading its
    result with `.numpy()`).
    """
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def keras_train_step(model, data):
    """One `model.train_function` step on `data` (repeated), waiting for it; Keras 2 or 3.

    For a `DPKerasModel` with Poisson sampling, `data` is one micro-batch
    (x, y, mask, step_end) and each repetition is the next logical step, with
    the identity the model checks (one micro-batch per step).
    """
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensors(data).repeat()
    config = getattr(model, "dp_config", None)
    if config is not None and config.sampling == "poisson":
        from tan_keras.mechanism import content_digest, sampling

        rows = len(data[2])
        start = int(model.sampling_position.numpy())

        def numbered(index, element):
            identity = sampling.identity_rows(
                start + index,
                0,
                1,
                config.dataset_size,
                config.expected_batch_size,
                0,
                rows,
            )
            # The pipelines that draw micro-batches seal them; this one is ours.
            identity = content_digest._seal(tuple(element[:3]), identity)
            return (*element, identity)

        dataset = dataset.enumerate().map(numbered)
    iterator = iter(dataset)
    # Keras 2 returns the function, Keras 3 only sets it; both set it.
    model.make_train_function()

    def step():
        logs = model.train_function(iterator)
        if isinstance(logs, tf.experimental.Optional):  # Keras 3
            logs = logs.get_value()
        tf.nest.map_structure(lambda t: t.numpy(), logs)  # wait for the step

    return step


def peak_rss_mb():
    """This process's peak memory (max RSS) so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def print_result(result):
    """What a child prints for `child_result` to read."""
    print(_RESULT + json.dumps(result), flush=True)


def child_result(cmd, what, env=None):
    """Runs a child process (TensorFlow's C++ log off); returns its `print_result` dict.

    Raises:
      RuntimeError: naming `what`, with the end of the child's stderr, if it
        failed or printed no result.
    """
    env = dict(os.environ if env is None else env, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith(_RESULT)]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{what} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len(_RESULT) :])


def chunk_arg(value):
    """--examples_per_chunk as DPKerasModel takes it; ValueError when invalid."""
    from tan_keras import _validate

    if value == "auto":
        return value
    if value.lower() == "none":
        return None
    return _validate.examples_per_chunk(int(value))


def check_args(parser, args, lows):
    """Exits through `parser.error` on an integer flag below its low or a bad --examples_per_chunk.

    Args:
      parser: The script's `argparse.ArgumentParser`.
      args: Its parsed arguments.
      lows: (flag, lowest value) pairs.
    """
    for name, low in lows:
        if getattr(args, name) < low:
            parser.error(f"--{name}: expected an integer >= {low}; received {getattr(args, name)}")
    value = getattr(args, "examples_per_chunk", "auto")
    try:
        chunk_arg(value)
    except ValueError:
        parser.error(
            f"--examples_per_chunk: expected 'auto', 'none' or an integer >= 1; received {value!r}"
        )


def fmt_ratio(ratio):
    """A ratio as printed in the tables: '1.23x', or '-' when there is none."""
    return "-" if ratio is None else f"{ratio:.2f}x"
