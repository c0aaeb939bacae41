"""Refuses models whose layers would leak information across examples.

DP-SGD bounds each example's influence through its clipped gradient only.
Layers that mix examples (BatchNormalization normalizes with batch statistics)
or keep state updated from data (moving means, activity regularizers feeding
data-dependent losses) leak outside that bound, so they are refused with an
error that says why and what to use instead. State updates are found by
behaviour, whatever the layer's class: one training-mode call is traced and
every variable it writes is reported (`model_analysis.state_updates`).

BatchNormalization in inference mode -- frozen (`trainable=False`), as in a
pretrained base of the Keras transfer-learning recipe -- normalizes each
example with fixed statistics and writes nothing: it is accepted. In
training mode it both mixes the examples of the batch and writes its moving
statistics, so the trace finds it. (Keras 3 overrides a nested model's
`training=False` with the train step's `training=True`: only freezing the
layer keeps it in inference mode.)
"""

import os
from typing import List, Tuple

import keras
import numpy as np
import tensorflow as tf

from tan_keras import _keras_internals
from tan_keras.mechanism import data_copies, model_analysis

_BATCH_NORM_HINT = (
    "BatchNormalization in training mode mixes the examples of a batch (each output "
    "depends on the batch mean and variance) and updates moving statistics from the "
    "data; neither is covered by per-example clipping, so the DP guarantee would not "
    "hold. For a pretrained model, keep it in inference mode by freezing it: "
    "layer.trainable = False on the layer (also when fine-tuning the rest of the base; "
    "in Keras 3, calling the base with training=False does not survive the train "
    "step's training=True); its fixed statistics then mix nothing. To train "
    "normalization, use keras.layers.GroupNormalization (e.g. groups=16) or "
    "LayerNormalization, or weight-standardized convolutions as in "
    "tan_keras.models.nf_resnet50."
)


def check_model_is_dp_compatible(model: keras.Model) -> None:
    """Raises if `model` contains a layer that breaks per-example privacy.

    Args:
      model: The Keras model to be trained with DP-SGD.

    Raises:
      ValueError: naming the first offending layer, saying why it breaks the
        guarantee and what to use instead: a trainable TFSMLayer (its
        SavedModel has no privacy ledger), BatchNormalization,
        an activity regularizer, a layer calling add_loss on its inputs, or
        any layer whose training-mode call writes
        a variable or runs Python code through `tf.py_function` (found by
        tracing one call, see `model_analysis`).
    """
    batch_norms = {}
    for layer in _keras_internals.all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            batch_norms[layer.name] = layer
        if _is_tfsm_layer(layer) and layer.trainable:
            raise ValueError(
                f"Layer `{layer.name}` (TFSMLayer) is trainable, but a SavedModel (the "
                "output of `model.export()`) carries no privacy ledger: weights trained "
                "privately before would be counted from zero, and epsilon under-reported. "
                "Load the model's `.keras` or `.weights.h5` file instead (they carry the "
                "ledger), or pass trainable=False to TFSMLayer (its weights then stay "
                "fixed; what they went through before is yours to account)."
            )
        if isinstance(layer, keras.layers.RNN) and not layer.unroll:
            raise ValueError(
                f"Layer `{layer.name}` ({type(layer).__name__}) runs its time steps in a "
                "while loop, which the per-example gradients cannot vectorize. Build it "
                "with unroll=True (the sequence length must then be fixed; fine for short "
                "sequences), or use a convolution or attention block over the sequence."
            )
        if getattr(layer, "activity_regularizer", None) is not None:
            raise ValueError(
                f"Layer `{layer.name}` has an activity_regularizer. Its loss depends "
                "on the data of the whole batch and is not clipped per example, so "
                "the DP guarantee would not hold. Remove it (weight regularizers "
                "such as kernel_regularizer are fine: they do not depend on data)."
            )
    printed = sorted(model_analysis.OUTPUT_OPS & model_analysis.op_types(model))
    if printed:
        raise ValueError(model_analysis.output_refusal("The model's training call", printed[0]))
    python = sorted(model_analysis.PYTHON_OPS & model_analysis.op_types(model))
    if python:
        raise ValueError(
            f"The model's training call runs Python code through a {python[0]} op "
            "(tf.py_function or tf.numpy_function, in a Lambda, a custom layer or a "
            "TextVectorization function). It cannot be trained with DP-SGD: that code "
            "runs on each example and may keep state between examples (a running sum, a "
            "list of what it saw), which no trace can see, so one example could move "
            "every later update. Write the computation with TensorFlow or keras.ops."
        )
    loss_layers = model_analysis.call_loss_layers(model)
    if loss_layers:
        raise ValueError(
            f"Layer `{loss_layers[0]}` calls add_loss in its call: that loss depends on "
            "the data of the whole batch and is not part of any example's clipped "
            "gradient, so the DP guarantee would not hold (and the term would be "
            "dropped). Fold a per-example term into the loss given to compile() (it is "
            "then clipped with the example), or use a weight regularizer such as "
            "kernel_regularizer for a penalty that does not depend on data."
        )
    for write in model_analysis.state_updates(model):
        if write.layer in batch_norms:
            raise ValueError(
                f"Layer `{write.layer}` ({write.layer_type}) runs in training mode, so it "
                f"cannot be trained with DP-SGD. {_BATCH_NORM_HINT}"
            )
        where = "Code outside every layer"
        if write.layer is not None:
            where = f"Layer `{write.layer}` ({write.layer_type})"
        raise ValueError(
            f"{where} writes the variable `{write.resource}` (op {write.op_type}) when "
            "called in training mode, so it cannot be trained with DP-SGD: values "
            "computed from single examples would be written into the model's weights "
            "(and saved with them) unclipped and un-noised, outside the per-example "
            "bound of DP-SGD. Keep such state fixed during training (a non-trainable "
            "weight that is only read is fine), compute statistics on public data "
            "beforehand, or use a layer without data-dependent state (e.g. "
            "GroupNormalization instead of BatchNormalization)."
        )


def vectorizing_crashes(model: keras.Model) -> bool:
    """Whether `tf.vectorized_map` over `model`'s examples would crash TensorFlow.

    With oneDNN on a CPU (TensorFlow's default on recent x86 CPUs), the
    vectorized form of an `Einsum` op with a weight operand (`EinsumDense`,
    so every `MultiHeadAttention`) aborts the process (measured on TF 2.21:
    "Segmentation fault" / "free(): invalid pointer"). Such models take the
    per-example gradients one example at a time instead: the same values,
    slower, and no restart with TF_ENABLE_ONEDNN_OPTS=0 needed.

    Args:
      model: A built Keras model with known inputs.

    Returns:
      True when oneDNN runs on a CPU and the model's training call has an
      `Einsum` op.
    """
    return _onednn_on_cpu() and "Einsum" in model_analysis.op_types(model)


def _is_tfsm_layer(layer) -> bool:
    """Whether `layer` is a `keras.layers.TFSMLayer` (a reloaded SavedModel)."""
    tfsm_layer = getattr(keras.layers, "TFSMLayer", None)
    return tfsm_layer is not None and isinstance(layer, tfsm_layer)


def _onednn_on_cpu() -> bool:
    # oneDNN's state is fixed when TensorFlow loads (TF_ENABLE_ONEDNN_OPTS is
    # read then): ask TensorFlow rather than the environment as it is now.
    try:
        from tensorflow.python.util import _pywrap_util_port  # private TF API

        enabled = bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        enabled = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "").strip() not in ("0", "false")
    return enabled and not tf.config.list_logical_devices("GPU")


# Methods whose override would be silently bypassed, or would bypass DP:
# the DP step is DPKerasModel.train_step and computes the compiled loss per
# example itself.
_DP_STEP_METHODS = ("train_step", "compute_loss")


def check_no_custom_training_step(model: keras.Model, base: type) -> None:
    """Refuses a model class that overrides the training step or its loss.

    Args:
      model: The model to train privately (or wrap with make_private).
      base: The class whose methods count as not overridden (keras.Model
        for a model to wrap, DPKerasModel for a subclass of it).

    Raises:
      ValueError: naming the method and what to do instead.
    """
    for name in _DP_STEP_METHODS:
        if getattr(type(model), name) is not getattr(base, name):
            raise ValueError(
                f"{type(model).__name__} overrides {name}(), which private training "
                f"cannot honour: DPKerasModel's own train_step computes each example's "
                "loss with the loss given to compile(), clips and noises it; a custom "
                f"{name} would either be skipped silently or bypass the clipping and "
                "noise. Put custom loss logic into the loss function passed to compile(); "
                "test_step and compute_metrics may be overridden."
            )


# What the optimizer and the noisy update call on each trainable variable,
# outside the per-example clipping: the constraint after every update
# (`variable.assign(constraint(variable))`), the regularizer's gradient added
# to the noisy gradient (noisy_update.py).
_WEIGHT_FUNCTIONS = ("constraint", "regularizer")


def check_weight_functions(model: keras.Model) -> List[Tuple[str, np.ndarray]]:
    """Refuses a weight constraint or regularizer that holds training data or keeps state.

    Both act on the weights without clipping or noise, at every update: one
    built from the training data (a kernel_constraint pulling the kernel
    toward the per-feature mean) writes that data into the weights, however
    large the noise. Each is traced on its variable's spec, and the values
    its trace holds (constants, variables read) and the arrays the object
    holds go through the check of `data_copies.check_values` (training rows,
    their statistics, adapted state); one that writes a variable or calls
    Python (whose state no trace can see) is refused like an augmenter. Run
    at every fit, once the training arrays are registered.

    Args:
      model: The model about to be trained.

    Returns:
      The (name, array) values they hold, for the ledger's fingerprints.

    Raises:
      ValueError: naming the variable, the constraint or regularizer and what
        it holds or does.
    """
    values = []
    for variable in model.trainable_variables:
        for kind in _WEIGHT_FUNCTIONS:
            function = getattr(variable, kind, None)
            if function is not None:
                values += _weight_function_values(variable, kind, function)
    return values


def _weight_function_values(variable, kind: str, function) -> List[Tuple[str, np.ndarray]]:
    """What `function` (`variable`'s constraint or regularizer) holds, checked."""
    path = getattr(variable, "path", None) or variable.name
    where = f"The {kind} of `{path}` ({type(function).__name__})"
    spec = tf.TensorSpec(tuple(variable.shape), variable.dtype)

    def call(weight):
        return function(weight)

    written = model_analysis.function_writes(call, spec)
    if written:
        raise ValueError(
            f"{where} {written[0]}. The optimizer applies it to the weights after every "
            "update, outside the per-example clipping and the noise: state it keeps (or "
            "reads from Python) can carry training data into them. Use a constraint or "
            "regularizer that is a function of the weight alone (keras.constraints.MaxNorm, "
            "NonNeg, UnitNorm, keras.regularizers.L2)."
        )
    with tf.init_scope():  # read eagerly: captured tensors keep their values
        graph = tf.function(call).get_concrete_function(spec).graph
        values = data_copies.graph_values(graph)
    values += data_copies.held_arrays(function, f"{path}.{kind}")
    data_copies.check_values(values, where)
    return values
