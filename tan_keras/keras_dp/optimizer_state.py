"""An optimizer whose state belongs to other variables is refused (both backends).

A built Keras optimizer keeps one slot per variable it was built for
(momentum, Adam's moments): sums of the noisy updates those variables went
through. Given to another private model (the
optimizer object of a trained model passed to `compile`, or assigned to
`model.optimizer` after it), it would carry that model's updates into this
one's, which no ledger counts: on TensorFlow Keras refuses the unknown
variables itself, but Keras's stateless JAX step maps the slots to the
variables by position and trains silently. The same holds within one model
whose trainable set changed since the optimizer was built (layers frozen or
unfrozen): the slots would follow other weights.
"""

from typing import Any, Sequence

from tan_keras import _keras_internals


def check_built_for(optimizer: Any, variables: Sequence[Any]) -> None:
    """Refuses `optimizer` if it was built for other variables than `variables`.

    Args:
      optimizer: The model's optimizer (resolved by Keras's `compile`).
      variables: The model's trainable variables, in their order.

    Raises:
      ValueError: if the optimizer was built for other variables (or the
        same ones in another order).
    """
    built_for = _keras_internals.optimizer_built_for(optimizer)
    # Not built: no slots yet. Its iteration count alone (a loaded model's,
    # restored before the optimizer is built) says nothing about any data.
    if built_for is not None and [id(v) for v in built_for] != [id(v) for v in variables]:
        raise ValueError(
            "Invalid value for `optimizer`: expected a new optimizer (or a name such as "
            "'sgd'), or one built for this model's trainable variables, when the "
            "variables it was built for are other ones (another model's, or the "
            "trainable set changed since it was built): a built optimizer keeps state "
            "(momentum, moments) summing the noisy updates of the variables it was built "
            "for, which this model's ledger would not count. Built for "
            f"{len(built_for)} variables ({_names(built_for)}), this model trains "
            f"{len(variables)} ({_names(variables)}). Received: optimizer={optimizer!r} "
            "(already built)"
        )


def check_keeps_no_weight_average(optimizer: Any) -> None:
    """Refuses an optimizer that keeps its own moving average of the weights.

    Keras's `use_ema=True` keeps the average in optimizer variables that
    `keras.callbacks.SwapEMAWeights` swaps into the model, and that the end of
    `fit` writes over the weights: values the weights' ledger never saw, so a
    callback copying them mid-training (the best epoch's weights) took them
    out uncounted. The model's own `ema_decay` keeps the average with the
    ledger.

    Args:
      optimizer: The model's optimizer (resolved by Keras's `compile`).

    Raises:
      ValueError: if the optimizer was made with `use_ema=True`.
    """
    if getattr(optimizer, "use_ema", False):
        raise ValueError(
            "Invalid value for `optimizer`: expected an optimizer without its own moving "
            "average of the weights (use_ema=False), when this one keeps one: its "
            "averaged weights are swapped into the model (SwapEMAWeights) and written "
            "over the weights when fit ends without the privacy ledger seeing them. "
            "Pass ema_decay=... to make_private or DPKerasModel instead: the same "
            "average, counted by the ledger (ema_weights() swaps it in). Received: "
            f"optimizer={type(optimizer).__name__}(use_ema=True, "
            f"ema_momentum={getattr(optimizer, 'ema_momentum', None)})"
        )


def _names(variables: Sequence[Any], shown: int = 3) -> str:
    """The paths of the first few variables, for the message."""
    names = [str(getattr(v, "path", None) or getattr(v, "name", "?")) for v in variables]
    more = f", ... {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more if names else "none"
