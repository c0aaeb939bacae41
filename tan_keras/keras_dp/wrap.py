"""`make_private` and `make_private_with_epsilon` (TensorFlow backend).

`make_private` wraps an existing Keras model in a `DPKerasModel` over the
same layers (so the same weights, and their privacy ledger);
`make_private_with_epsilon` calibrates it to a privacy budget
(`budget.py`).
"""

from typing import Optional, Sequence

import keras

from tan_keras import _keras_internals, _validate
from tan_keras.keras_dp import budget, model_checks
from tan_keras.keras_dp import ledger as ledger_lib
from tan_keras.keras_dp.dp_model import DPKerasModel


def make_private(
    model: keras.Model, input_shape: Optional[Sequence[int]] = None, **dp_kwargs
) -> DPKerasModel:
    """Makes an existing Keras model private without rewriting it.

    The returned `DPKerasModel` shares the layers (and so the weights) of
    `model`; compile and fit the returned model.

    Args:
      model: A Keras 3 model: functional or Sequential with known inputs, or
        subclassed (then pass `input_shape`).
      input_shape: Shape of one example without the batch axis, for a model
        without known inputs (subclassed): it is called once on a
        `keras.Input` of that shape to make the functional model to train.
        Ignored if the model has inputs.
      **dp_kwargs: The DP arguments of `DPKerasModel` (l2_norm_clip,
        noise_multiplier, expected_batch_size, dataset_size, augmult,
        ema_decay, noise_seed, clipping, examples_per_chunk, sampling,
        release_train_metrics, clipped_fraction_std).

    Returns:
      A `DPKerasModel`.

    Raises:
      ValueError: if `model` is not a Keras 3 model, overrides train_step or
        compute_loss, its inputs are unknown and no `input_shape` is given,
        has a string input, or on a bad DP argument.
    """
    if not isinstance(model, keras.Model):
        raise ValueError(
            "Invalid value for `model`: expected a Keras 3 model (built with `import keras`). "
            f"Received: {type(model).__module__}.{type(model).__name__}. Models of the legacy "
            "Keras 2 package (tf_keras, or tf.keras with TF_USE_LEGACY_KERAS=1) cannot be "
            "trained by tan_keras."
        )
    model_checks.check_no_custom_training_step(model, keras.Model)
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):
        inputs = outputs = None
    known = bool(inputs) and bool(outputs)
    if known:
        # The structures the model was built with (a list or dict of inputs
        # or outputs), so that fit takes the same data as the original model.
        inputs = _keras_internals.inputs_structure(model)
        outputs = _keras_internals.outputs_structure(model)
    elif input_shape is not None:
        if isinstance(input_shape, (str, bytes)) or not hasattr(input_shape, "__iter__"):
            raise _validate.invalid(
                "input_shape", "a sequence of positive integers (one example)", input_shape
            )
        shape = tuple(_validate.positive_int("input_shape", d) for d in input_shape)
        inputs = keras.Input(shape)
        outputs = model(inputs)
        known = True
    if not known:
        raise ValueError(
            f"Invalid value for `input_shape`: expected the shape of one example for a model "
            f"without known inputs (subclassed). Received: input_shape=None for "
            f"model={model.name!r}."
        )
    if isinstance(inputs, list) and len(inputs) == 1:
        inputs = inputs[0]
    if isinstance(outputs, list) and len(outputs) == 1:
        outputs = outputs[0]
    private = DPKerasModel(inputs=inputs, outputs=outputs, name=model.name, **dp_kwargs)
    # The wrapped model's own files (model.save_weights, model.save) carry
    # the ledger too, and a later make_private of it finds the same one.
    ledger_lib.attach(model, private.privacy_ledger)
    return private


def make_private_with_epsilon(model: keras.Model, **kwargs) -> DPKerasModel:
    return budget.calibrated(make_private, model, **kwargs)


make_private_with_epsilon.__doc__ = budget.MAKE_PRIVATE_WITH_EPSILON_DOC
