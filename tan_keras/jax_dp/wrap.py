"""`make_private` and `make_private_with_epsilon` on the JAX backend.

`make_private` wraps an existing Keras model in a `DPKerasModel` over the
same layers (so the same weights, and their privacy ledger);
`make_private_with_epsilon` is the TensorFlow route's budget function
(`keras_dp/budget.py`) with this `make_private`.
"""

from typing import Optional, Sequence

import keras

from tan_keras import _keras_internals, _validate
from tan_keras.jax_dp import dp_model, model_config
from tan_keras.keras_dp import budget
from tan_keras.keras_dp import ledger as ledger_lib


def make_private(
    model: keras.Model, input_shape: Optional[Sequence[int]] = None, **dp_kwargs
) -> dp_model.DPKerasModel:
    """Makes an existing Keras model private (JAX backend); it shares its weights.

    Args:
      model: A functional or Sequential Keras 3 model with known inputs, or a
        subclassed one (then pass `input_shape`).
      input_shape: The shape of one example, for a model without known inputs.
      **dp_kwargs: The DP arguments of `DPKerasModel`.

    Returns:
      A `DPKerasModel` over the same layers.

    Raises:
      ValueError: if `model` is not a Keras model, overrides its training
        step, has no known inputs and no `input_shape`, or on a bad DP argument.
    """
    if not isinstance(model, keras.Model):
        raise _validate.invalid("model", "a Keras 3 model", type(model).__name__)
    model_config.refuse_custom_training_step(model, keras.Model)
    try:
        known = bool(model.inputs) and bool(model.outputs)
    except (AttributeError, ValueError):
        known = False
    if known:
        inputs = _keras_internals.inputs_structure(model)
        outputs = _keras_internals.outputs_structure(model)
    elif input_shape is not None:
        shape = tuple(_validate.positive_int("input_shape", d) for d in input_shape)
        inputs = keras.Input(shape)
        outputs = model(inputs)
    else:
        raise _validate.invalid(
            "input_shape", "the shape of one example for a subclassed model", input_shape
        )
    if isinstance(inputs, list) and len(inputs) == 1:
        inputs = inputs[0]
    if isinstance(outputs, list) and len(outputs) == 1:
        outputs = outputs[0]
    private = dp_model.DPKerasModel(inputs=inputs, outputs=outputs, name=model.name, **dp_kwargs)
    # The wrapped model's own files carry the ledger too, and a later
    # make_private of it finds the same one.
    ledger_lib.attach(model, private.privacy_ledger)
    return private


def make_private_with_epsilon(model: keras.Model, **kwargs) -> dp_model.DPKerasModel:
    return budget.calibrated(make_private, model, **kwargs)


make_private_with_epsilon.__doc__ = budget.MAKE_PRIVATE_WITH_EPSILON_DOC
