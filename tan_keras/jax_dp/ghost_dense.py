"""Ghost norms of Dense kernels on the JAX backend: clipping without per-example kernels.

A Dense layer's per-example kernel gradient is sum_t a_t d_t^T, with a_t its
inputs and d_t the gradient of the example's loss at its pre-activation
outputs (t over the views and any sequence positions of the example). Its
squared norm is sum_{t,s} (a_t . a_s)(d_t . d_s) (the "ghost norm", Goodfellow
2015; Li et al. 2022), and the clipped sum over examples is one contraction
sum_i f_i sum_t a_it d_it^T with each example's factor f_i = min(1, C/||g_i||)
(book-keeping, Bu et al. 2023). So the per-example pass forms a and d, not the
[in, out] gradient of every example: for a 401k-weight head, 96 x 401k floats
fewer per step.

The layer's call is replaced while the per-example loss is traced: the same
arithmetic as `keras.layers.Dense.call`, plus a zero added to the
pre-activation outputs, whose gradient is d, and the inputs recorded. Only
plain Dense layers qualify (their class's own `call`, no LoRA, no
quantization, a trainable kernel, called once per forward pass), and only
where the ghost norm is cheaper than the gradient itself: T^2 (in + out) <
T in out, with T the rows the layer sees per example.
"""

import contextlib
from typing import Any, Dict, List, NamedTuple, Optional

import jax
import jax.numpy as jnp
import keras
from keras import ops


class GhostKernel(NamedTuple):
    """A Dense layer whose kernel is clipped by its ghost norm.

    Attributes:
      layer: The layer.
      index: Its kernel's index in the model's trainable variables.
      output_shape: The shape of its pre-activation outputs for one example.
      output_dtype: Their dtype (the layer's compute dtype).
    """

    layer: keras.layers.Layer
    index: int
    output_shape: tuple
    output_dtype: Any


def _plain_dense(layer) -> bool:
    return (
        isinstance(layer, keras.layers.Dense)
        and type(layer).call is keras.layers.Dense.call
        # (A call set on the instance is the user's: left alone.)
        and "call" not in vars(layer)
        and layer.quantization_mode is None
        and not layer.lora_enabled
        and getattr(layer, "_kernel", None) is not None
        and layer._kernel.trainable
    )


@contextlib.contextmanager
def tapped(layers: List[keras.layers.Layer], taps: Optional[List], recorded: Dict[int, list]):
    """Context manager: the Dense `layers` add `taps[j]` to their outputs and record their inputs.

    Args:
      layers: The Dense layers.
      taps: For each layer, what to add to its pre-activation outputs (a
        zero whose gradient is d), or None to add nothing.
      recorded: Filled with {j: [(inputs, pre-activation outputs) of each call]}.
    """

    def make_call(j, layer):
        def call(inputs, training=None):
            del training  # (Dense ignores it)
            x = ops.matmul(inputs, layer.kernel)
            if layer.bias is not None:
                x = ops.add(x, layer.bias)
            if taps is not None:
                x = x + taps[j]
            recorded.setdefault(j, []).append((inputs, x))
            if layer.activation is not None:
                x = layer.activation(x)
            return x

        return call

    for j, layer in enumerate(layers):
        object.__setattr__(layer, "call", make_call(j, layer))
    try:
        yield
    finally:
        for layer in layers:
            object.__delattr__(layer, "call")


def _rows_per_example(shape) -> int:
    rows = 1
    for dim in shape[:-1]:
        rows *= int(dim)
    return rows


def ghost_kernels(model, example_loss, params, example) -> List[GhostKernel]:
    """The model's Dense kernels worth clipping by their ghost norm.

    Args:
      model: The private model.
      example_loss: (params, example) -> (loss, outputs) for one example.
      params: The trainable parameters.
      example: One example (its shapes are what matter).

    Returns:
      The `GhostKernel`s, in the order of the model's layers.
    """
    candidates = [layer for layer in model._flatten_layers() if _plain_dense(layer)]
    if not candidates:
        return []
    recorded: Dict[int, list] = {}

    def forward(p, e):
        with tapped(candidates, None, recorded):
            return example_loss(p, e)

    jax.eval_shape(forward, params, example)
    indices = {id(v): i for i, v in enumerate(model.trainable_variables)}
    chosen = []
    for j, layer in enumerate(candidates):
        calls = recorded.get(j, [])
        if len(calls) != 1 or id(layer._kernel) not in indices:
            continue  # a shared layer (two calls), or one the loss does not reach
        inputs, outputs = calls[0]
        rows = _rows_per_example(outputs.shape)
        fan_in, fan_out = int(inputs.shape[-1]), int(outputs.shape[-1])
        if rows * (fan_in + fan_out) < fan_in * fan_out:
            chosen.append(
                GhostKernel(layer, indices[id(layer._kernel)], tuple(outputs.shape), outputs.dtype)
            )
    return chosen


def _rescaled(a: jax.Array):
    """(a / max|a|, max|a|), with the scale 1 for a zero or non-finite maximum."""
    top = jnp.max(jnp.abs(a))
    safe = jnp.where(jnp.logical_and(top > 0, jnp.isfinite(top)), top, 1.0)
    return a / safe, top


def ghost_norm(inputs: jax.Array, grads: jax.Array) -> jax.Array:
    """||sum_t a_t d_t^T|| of one example, finite where the kernel gradient is.

    Args:
      inputs: [..., in] the layer's inputs for one example (a).
      grads: [..., out] the gradient at its pre-activation outputs (d).

    Returns:
      The norm (float32), taken on rescaled values so that it does not
      overflow where the gradient's entries are finite.
    """
    a = inputs.astype(jnp.float32).reshape((-1, inputs.shape[-1]))
    d = grads.astype(jnp.float32).reshape((-1, grads.shape[-1]))
    a, a_top = _rescaled(a)
    d, d_top = _rescaled(d)
    squared = jnp.sum((a @ a.T) * (d @ d.T))
    return a_top * d_top * jnp.sqrt(jnp.maximum(squared, 0.0))


def clipped_kernel_sum(inputs: jax.Array, grads: jax.Array, factors: jax.Array) -> jax.Array:
    """sum_i factors_i sum_t a_it d_it^T: the clipped sum of the rows' kernel gradients.

    Args:
      inputs: [rows, ..., in] the rows' inputs (zero where a row adds nothing).
      grads: [rows, ..., out] the gradients at the rows' outputs (likewise).
      factors: [rows] each row's clipping factor (0 for padding, non-finite).

    Returns:
      [in, out] float32.
    """
    rows = inputs.shape[0]
    a = inputs.astype(jnp.float32).reshape((rows, -1, inputs.shape[-1]))
    d = grads.astype(jnp.float32).reshape((rows, -1, grads.shape[-1]))
    return jnp.einsum("r,rti,rto->io", factors, a, d)
