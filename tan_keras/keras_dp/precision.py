"""Which floating-point policies keep the DP guarantee, and which are refused.

* float32: the reference.
* mixed_bfloat16: layers compute in bfloat16, variables stay float32.
  bfloat16 has float32's exponent range, so no loss scaling is needed; the
  per-example gradients are cast to float32 before their norms are taken
  and clipped, so clipping bounds the gradient the update actually uses.
* float16 compute (the "mixed_float16" policy, or any layer computing in
  float16): its small exponent range needs loss scaling, which Keras does
  with a LossScaleOptimizer on the batch loss. The DP step clips per-example
  gradients of unscaled losses, so small gradients would underflow to zero
  in float16, and scaling each example's loss would need its own overflow
  handling before clipping. Refused rather than silently inexact.
"""

import keras

from tan_keras import _keras_internals


def check_precision(model: keras.Model) -> None:
    """Refuses float16 computation in `model`.

    Args:
      model: The Keras model to be trained with DP-SGD.

    Raises:
      ValueError: naming the first layer that computes in float16.
    """
    for layer in _keras_internals.all_layers(model):
        if getattr(layer, "compute_dtype", None) == "float16":
            raise ValueError(
                f"Layer `{layer.name}` computes in float16 (dtype policy "
                f"{getattr(layer.dtype_policy, 'name', layer.dtype_policy)!r}). "
                "DP-SGD in tan_keras does not support float16: it needs loss scaling, "
                "which Keras applies to the batch loss while the DP step clips "
                "per-example gradients, so small gradients would underflow. Use "
                "keras.mixed_precision.set_global_policy('mixed_bfloat16') (no loss "
                "scaling needed) or float32."
            )


def check_optimizer(optimizer) -> None:
    """Refuses a loss-scaling optimizer (see the module docstring).

    Args:
      optimizer: The optimizer given to `compile` (resolved by Keras).

    Raises:
      ValueError: if it is a `LossScaleOptimizer`.
    """
    if isinstance(optimizer, keras.mixed_precision.LossScaleOptimizer):
        raise ValueError(
            "Invalid value for `optimizer`: expected an optimizer without loss scaling. "
            "Received: a LossScaleOptimizer. The DP step clips per-example gradients of "
            "unscaled losses; use float32 or the 'mixed_bfloat16' policy."
        )
