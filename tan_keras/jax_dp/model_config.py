"""What a JAX `DPKerasModel` accepts: its arguments, its config, its methods.

The TensorFlow route's options this backend does not offer yet are refused
by name at any value but their default; a config written by either
backend's `DPKerasModel` loads when it holds only settings this one has; a
model class that overrides the training step is refused (its loss would not
be each example's).
"""

import keras

from tan_keras import _validate
from tan_keras.keras_dp.dp_config import MODEL_CONFIG_KEYS

# Arguments of the TensorFlow route that this backend does not offer yet, and
# the one value of each it accepts (the default).
_NOT_YET = {
    "noise_seed": None,
    "sampling": "poisson",
}
# The training step of these methods is DPKerasModel's own.
_DP_STEP_METHODS = ("train_step", "compute_loss", "compute_loss_and_updates")
# What Keras's Functional.get_config writes (the layer graph).
_FUNCTIONAL_CONFIG_KEYS = frozenset(
    {"name", "trainable", "layers", "input_layers", "output_layers"}
)


def refuse_options_not_ported(kwargs: dict) -> None:
    """Takes the TensorFlow route's options out of `kwargs`; refuses any but their default.

    Raises:
      ValueError: naming the option, its one accepted value and the value received.
    """
    for name, default in _NOT_YET.items():
        value = kwargs.pop(name, default)
        if value != default:
            raise _validate.invalid(
                name,
                f"{default!r} on the JAX backend (the other values exist on the "
                "TensorFlow backend only, for now)",
                value,
            )


# The clipping routes of this backend (`DPKerasModel`'s `clipping`).
CLIPPING_MODES = ("auto", "vectorized")


def checked_clipping(clipping: str) -> str:
    """`clipping`, one of `CLIPPING_MODES`.

    Raises:
      ValueError: naming the argument, the values this backend takes and the value.
    """
    if clipping not in CLIPPING_MODES:
        raise _validate.invalid(
            "clipping",
            f'one of {CLIPPING_MODES} on the JAX backend ("auto" clips Dense kernels and '
            'Embedding tables by their ghost norms; the TensorFlow backend also has "ghost" '
            'and "layerwise")',
            clipping,
        )
    return clipping


def refuse_custom_training_step(model: keras.Model, base: type) -> None:
    """Refuses a model whose class overrides `base`'s training step.

    Raises:
      ValueError: naming the method overridden.
    """
    for name in _DP_STEP_METHODS:
        if getattr(type(model), name) is not getattr(base, name):
            raise ValueError(
                f"{type(model).__name__} overrides {name}(), which private training cannot "
                "honour: DPKerasModel's train_step computes each example's loss with the loss "
                "given to compile(), clips and noises it. Put custom loss logic into the loss "
                "function passed to compile()."
            )


def accepted(config: dict) -> dict:
    """A saved DPKerasModel config as this backend's `from_config` takes it.

    Raises:
      ValueError: for keys this backend does not know (settings of the
        TensorFlow route only).
    """
    config = dict(config)
    dp_kwargs = {key: config.pop(key) for key in MODEL_CONFIG_KEYS if key in config}
    unknown = sorted(set(config) - _FUNCTIONAL_CONFIG_KEYS)
    if unknown:
        raise ValueError(
            f"Invalid DPKerasModel config: unknown keys {unknown}; on the JAX backend, a "
            "model saved with settings of the TensorFlow route only cannot be loaded yet."
        )
    return {**config, **dp_kwargs}
