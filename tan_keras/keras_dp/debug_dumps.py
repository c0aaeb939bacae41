"""TensorFlow's tensor dumps, refused around a private `fit`.

`tf.debugging.experimental.enable_dump_debug_info(dir, tensor_debug_mode=...)`
makes TensorFlow write the tensors of every op it runs to disk, in every
graph built afterwards: the training rows, each example's gradient and
which examples each secret Poisson step drew, outside the noisy update (a
review found all 64 training rows in a FULL_TENSOR dump of a private fit).
The switch is process-wide and TensorFlow's own; the package only reads it.
"""

from tan_keras import _validate


def refuse_tensor_dumps() -> None:
    """Refuses a private `fit` while TensorFlow dumps tensors (module doc).

    Raises:
      ValueError: if `enable_dump_debug_info` is on in this process.
    """
    try:
        from tensorflow.python.debug.lib import dumping_callback
    except ImportError:  # a TensorFlow without the debugger: nothing can dump
        return
    state = getattr(dumping_callback, "_state", None)
    dumping = getattr(state, "dumping_callback", None)
    if dumping is not None:
        raise _validate.invalid(
            "tf.debugging.experimental.enable_dump_debug_info",
            "off during private training (disable_dump_debug_info())",
            f"on, writing to {getattr(dumping, '_dump_root', '?')!r}",
            "TensorFlow would write every tensor of the training step to disk: the "
            "training rows, each example's gradient and which examples each Poisson "
            "step drew, outside the noisy update. Debug the same model with plain "
            "Keras on public data.",
        )
