"""TensorFlow's start-up, without its C++ log lines on the program's console.

TensorFlow 2.20+ logs through absl's C++ logging when it loads and finds its
devices: on a CPU machine, "Could not find cuda drivers", a "failed call to
cuInit" error, the oneDNN notice, each twice. `TF_CPP_MIN_LOG_LEVEL` no longer
silences them, and none is news to someone training on CPU. The training
program loads TensorFlow through `load_tensorflow`, which sends stderr to
/dev/null only while TensorFlow loads and lists its devices (Python errors
still propagate and print), then says itself what a user needs: that an
NVIDIA device is present but TensorFlow found no GPU. Set
TAN_KERAS_TF_STARTUP_LOG=1 to see TensorFlow's own lines. TensorFlow's
Python INFO messages are turned off too; its warnings stay.
"""

import contextlib
import logging
import os
import sys
import warnings

_SHOW_ENV = "TAN_KERAS_TF_STARTUP_LOG"


_QUIET_LIBRARIES = (f"{os.sep}tensorflow{os.sep}", f"{os.sep}tensorflow_datasets{os.sep}")


def _drop_tensorflow_info(record: logging.LogRecord) -> bool:
    # TensorFlow's and TFDS's INFO lines ("Load dataset info from ...",
    # "fields info.[module_name] differ on disk and in the code") say
    # nothing a user can act on; their warnings and errors stay.
    return record.levelno > logging.INFO or not any(
        library in record.pathname for library in _QUIET_LIBRARIES
    )


def quiet_library_info() -> None:
    """Drops TensorFlow's and TFDS's INFO log lines (on the JAX backend, TFDS without TF)."""
    logging.getLogger("absl").addFilter(_drop_tensorflow_info)


@contextlib.contextmanager
def _stderr_muted():
    """File descriptor 2 goes to /dev/null inside the block (C++ logs write there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def load_tensorflow():
    """Imports TensorFlow and lists its devices with stderr muted; returns `tf`."""
    if os.environ.get(_SHOW_ENV, "").strip() not in ("", "0"):
        import tensorflow as tf

        return tf
    with _stderr_muted():
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
    # TensorFlow's Python INFO lines (e.g. the checkpoint saver's "Sharding
    # callback duration", logged through absl) would reach the console.
    tf.get_logger().setLevel(logging.WARNING)
    logging.getLogger("absl").addFilter(_drop_tensorflow_info)
    if not gpus and os.path.exists("/dev/nvidia0"):
        warnings.warn(
            "An NVIDIA device is present but TensorFlow found no GPU: training runs on "
            f"the CPU. Run with {_SHOW_ENV}=1 to see TensorFlow's start-up log (drivers, "
            "CUDA libraries).",
            stacklevel=2,
        )
    return tf


def quiet_jax_start() -> None:
    """Keeps start-up lines a user can do nothing about off a JAX run's console.

    JAX logs at INFO that it found no TPU (absl's handler prints INFO under
    `app.run`); Keras's saving imports TensorFlow wherever it is installed,
    on any backend, and TensorFlow's C++ start-up lines would then reach
    stderr at the first checkpoint: it is imported here with stderr muted.
    """
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    if os.environ.get(_SHOW_ENV, "").strip() not in ("", "0"):
        return
    try:
        with _stderr_muted():
            import tensorflow  # noqa: F401
    except ImportError:
        pass  # not installed: nothing to mute
