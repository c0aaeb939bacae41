"""What one example's loss runs and holds, read from its trace before training.

The loss the train step differentiates per example (`example_loss.py`) is
traced with `jax.make_jaxpr` at every `fit`, before any update, and refused
when its trace (nested jaxprs included: jit, custom_jvp/custom_vjp, scan,
while, cond) holds

* a callback primitive (`jax.pure_callback`, `io_callback`,
  `jax.debug.callback`, `jax.debug.print`): it runs Python code on each
  example, and that code may keep state between examples (a running
  maximum, a list of what it saw) that no trace can see, so one example
  could move every later update; the TensorFlow route refuses
  `tf.py_function` and `tf.numpy_function` likewise (`model_checks.py`);
* a function with a batching rule of its own (`jax.custom_batching`): the
  loss is vmapped over a step's rows, and such a rule sees all of them;
* a constant, or a variable of the model, holding rows of the training data,
  a statistic of them, or state `adapt` computed and no mark vouches for
  (`data_copies.check_values`, as the TensorFlow route checks the values its
  traced graph holds): a Lambda closing over a pool of training examples, a
  `Normalization` given the training set's mean by hand, a kernel
  constraint pulling the weights towards the training data's mean;
* a write to a Keras variable the model does not track: dropped with the
  step's stateless scope on JAX, it would silently not happen (and kept,
  it would carry one example into the next ones' gradients);
* a collective (`jax.lax.psum`, `pmean`, `pmax`, `all_gather`, `ppermute`,
  `all_to_all`, `axis_index`, ...): a SyncBatchNorm-style mean over the
  devices' rows would let each example's forward read the rows at its
  position on the other devices, which no clip bounds. The trace binds the
  mesh's axes (the distribution's `batch_dim_name` and the name of its own the
  step's rows axis takes, `clipped_sum.ROWS_AXIS`), so that a layer
  reaching for one shows it here rather than falling back to its
  one-device path; in the step itself the distribution's name is unbound.

The trace is the gradient's (the forward and a custom_vjp's backward rule).

Traced at every fit rather than once per compiled step: the training rows
registered and the layers adapted may change between fits. One trace of the
loss and its gradient, on abstract values; nothing runs.
"""

import contextlib
import re
from typing import Iterator, List, Optional, Tuple

import jax
import jax.extend.core as jax_core
import numpy as np
from keras.src import backend as keras_backend

from tan_keras import _keras_internals
from tan_keras.jax_dp import clipped_sum, jax_step
from tan_keras.jax_dp import example_loss as example_loss_lib
from tan_keras.mechanism import data_copies, provenance


def check(model, example) -> None:
    """Traces `model`'s one-example loss on `example`; refuses what the module doc names.

    Args:
      model: A compiled, built JAX `DPKerasModel`.
      example: `(inputs, labels)` of one training example, without a batch
        axis (inputs with their K views first when augmult > 1).

    Raises:
      ValueError: naming the layer (or the primitive) that calls back into
        Python, the value that copies training data, the variable the
        loss writes (`example_loss`), or the collective it uses, with what
        to do instead.
    """
    non_trainable = [v.value for v in model.non_trainable_variables]
    metrics_state = [v.value for v in model.metrics_variables]
    seed_indices = example_loss_lib.seed_state_indices(model)
    loss_fn = example_loss_lib.example_loss(model, non_trainable, metrics_state, seed_indices)
    trainable = [v.value for v in model.trainable_variables]
    # The gradient's trace, not only the loss's: a custom_vjp's backward
    # rule runs only when differentiated, and may call back into Python.
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
    with _recording_writes() as written:
        closed = jax.make_jaxpr(value_and_grad, axis_env=_step_axes())(
            trainable, (example, np.uint32(0))
        )
    _refuse_untracked_writes(model, written)
    collective = _collective(closed.jaxpr)
    if collective is not None:
        raise ValueError(_collective_refusal(model, *collective))
    called = _callback(closed.jaxpr)
    if called is not None:
        raise ValueError(_callback_refusal(model, *called))
    batched = _batching_rule(closed.jaxpr)
    if batched is not None:
        raise ValueError(_batching_rule_refusal(model, batched))
    # The variables the loss reads (those not trained are closed over as
    # constants, the trained ones are arguments: a kernel set from training
    # rows counts too), by name, then every constant of the trace.
    seeds = {id(model.non_trainable_variables[i]) for i in seed_indices}
    weights = [v for v in model.weights if id(v) not in seeds]
    values = [(v.path, array) for v in weights for _, array in _numeric([v.value])]
    used_in = _where_used(closed.jaxpr)
    values += [
        (f"{used_in[i]}/constant" if used_in.get(i) else f"constant {i}", array)
        for i, array in _numeric(closed.consts)
    ]
    values += _nested_constants(closed.jaxpr)
    values += _constraint_values(model)
    provenance.discover_adapted()
    data_copies.check_values(values, f"The model `{model.name}`")


def _constraint_values(model) -> List[Tuple[str, np.ndarray]]:
    """The constants the trainable variables' constraints hold, read from their traces.

    The optimizer applies a constraint to the noisy weights after each
    update: a function of the weights alone is post-processing, but one
    holding training data (their mean, rows) would write it into the weights.
    A constraint that calls back into Python is refused as in the loss.
    """
    found = []
    for variable in model.trainable_variables:
        constraint = variable.constraint
        if constraint is None:
            continue
        spec = jax.ShapeDtypeStruct(tuple(variable.shape), variable.dtype)
        closed = jax.make_jaxpr(constraint)(spec)
        where = f"{variable.path}/constraint"
        called = _callback(closed.jaxpr)
        if called is not None:
            raise ValueError(
                f"The constraint of `{variable.path}` runs Python code through a "
                f"`{called[0]}` primitive: applied to the weights after every update, "
                "that code may keep state no trace can see. Write it with keras.ops."
            )
        found += [(where, array) for _, array in _numeric(closed.consts)]
        found += [(where, array) for _, array in _nested_constants(closed.jaxpr)]
        # What it was built with, traced or not (as on TensorFlow).
        found += data_copies.held_arrays(constraint, f"{variable.path}.constraint")
    return found


@contextlib.contextmanager
def _recording_writes() -> Iterator[list]:
    """Records every Keras variable assigned in a stateless scope while tracing."""
    written = []
    add_update = keras_backend.StatelessScope.add_update

    def recording(scope, update):
        written.append(update[0])
        return add_update(scope, update)

    keras_backend.StatelessScope.add_update = recording
    try:
        yield written
    finally:
        keras_backend.StatelessScope.add_update = add_update


def _refuse_untracked_writes(model, written) -> None:
    """Refuses a write to a variable the model does not track (module doc)."""
    # The model's own state writes are refused by `example_loss` (tracked
    # non-trainable variables) with their name; a variable the model does
    # not track is written in the scope and dropped with it, so the layer
    # would silently read its old value on the next step.
    tracked = {id(v) for v in (*model.variables, *model.metrics_variables)}
    for variable in written:
        if id(variable) not in tracked:
            name = getattr(variable, "path", None) or getattr(variable, "name", "?")
            raise ValueError(
                f"The model writes the variable `{name}`, which it does not track (a "
                "keras.Variable kept outside the layers' weights), while it trains. On the "
                "JAX backend such a write is dropped after each step, and a state computed "
                "from one example would carry it into the clipped gradients of the next "
                "ones if it were kept. Make the variable a weight of its layer "
                "(add_weight) that the training does not write, or compute the value "
                "without state."
            )


def _equations(jaxpr, stack: str = "") -> Iterator[Tuple[object, str]]:
    """Every equation of `jaxpr` and of the jaxprs nested in it, with its name stack."""
    for eqn in jaxpr.eqns:
        inner = _layer_path(str(eqn.source_info.name_stack))
        where = "/".join(part for part in (stack, inner) if part)
        yield eqn, where
        for sub in _subjaxprs(eqn.params):
            yield from _equations(sub.jaxpr if hasattr(sub, "consts") else sub, where)


def _layer_path(stack: str) -> str:
    """A name stack without the wrappers differentiation adds ("transpose(jvp(dense))")."""
    while True:
        bare = re.sub(r"\b(?:jvp|transpose|vmap)\(([^()]*)\)", r"\1", stack)
        if bare == stack:
            return bare
        stack = bare


def _where_used(jaxpr) -> dict:
    """Index of each top-level constant -> name stack of the first equation reading it."""
    index = {id(var): i for i, var in enumerate(jaxpr.constvars)}
    found = {}
    for eqn in jaxpr.eqns:
        for var in eqn.invars:
            i = index.get(id(var))
            if i is not None and i not in found:
                found[i] = _layer_path(str(eqn.source_info.name_stack))
    return found


def _subjaxprs(params) -> Iterator[object]:
    """The jaxprs (open or closed) among an equation's parameters."""
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, (jax_core.ClosedJaxpr, jax_core.Jaxpr)):
                yield item


def _callback(jaxpr) -> Optional[Tuple[str, str]]:
    """(primitive name, name stack) of the first callback or print primitive, or None."""
    # jax.debug.print is a primitive of its own (`debug_print` in JAX 0.10),
    # not a callback: it would print examples' values out of the step.
    for eqn, where in _equations(jaxpr):
        name = eqn.primitive.name
        if "callback" in name or "print" in name:
            return name, where
    return None


def _batching_rule(jaxpr) -> Optional[str]:
    """The name stack of the first function with a batching rule of its own, or None."""
    for eqn, where in _equations(jaxpr):
        if eqn.primitive.name == "custom_vmap_call":
            return where
    return None


# Collective primitives (jax.lax's parallel operators; pmean is a psum).
_COLLECTIVES = frozenset(
    (
        "psum psum2 psum_invariant unreduced_psum pmax pmin pbroadcast ppermute pshuffle "
        "pgather all_gather all_gather_invariant all_gather_reduced all_to_all "
        "ragged_all_to_all reduce_scatter unreduced_reduce_scatter axis_index psend precv"
    ).split()
)


def _step_axes() -> List[Tuple[str, int]]:
    """(name, size) of every axis a layer could name in the training step (module doc)."""
    mesh, _, devices = jax_step.data_parallel()
    axes = [(clipped_sum.ROWS_AXIS, devices)]
    if mesh is not None:
        axes += [(name, mesh.shape[name]) for name in mesh.axis_names]
    return axes


def _collective(jaxpr) -> Optional[Tuple[str, str, str]]:
    """(primitive name, its axes, name stack) of the first collective, or None."""
    for eqn, where in _equations(jaxpr):
        name = eqn.primitive.name
        if name.removesuffix("_start").removesuffix("_done") in _COLLECTIVES:
            axes = eqn.params.get("axes", eqn.params.get("axis_name", "?"))
            return name, str(axes), where
    return None


def _collective_refusal(model, primitive: str, axes: str, where: str) -> str:
    return (
        f"{_who(model, where)} uses the collective `{primitive}` over the axis {axes} "
        "(jax.lax.psum, pmean, pmax, all_gather, ppermute, all_to_all, axis_index, ...). "
        "The per-example loss must compute each example alone: a collective across "
        "devices (a synchronized batch normalization, say) lets one example's forward read "
        "the rows at its position on the other devices, which no clip bounds. Normalize "
        "each example on its own (LayerNormalization, GroupNormalization) or compute "
        "without collectives."
    )


def _batching_rule_refusal(model, where: str) -> str:
    return (
        f"{_who(model, where)} calls a function with a batching rule of its own "
        "(jax.custom_batching.custom_vmap or sequential_vmap). The per-example loss is "
        "vmapped over the rows of a step, and such a rule receives every row at once: it "
        "could mix examples (centre on the rows' mean, say) before their gradients are "
        "clipped, so that one example moves the others' gradients. Write the computation "
        "for one example with jax.numpy or keras.ops."
    )


def _who(model, where: str) -> str:
    """The innermost layer of the model named in a name stack, or its loss."""
    layers = {layer.name for layer in _keras_internals.all_layers(model)}
    named = [part for part in where.split("/") if part in layers]
    return f"Layer `{named[-1]}`" if named else "The model's loss"


def _callback_refusal(model, primitive: str, where: str) -> str:
    return (
        f"{_who(model, where)} runs Python code on each example through a `{primitive}` primitive "
        "(jax.pure_callback, jax.experimental.io_callback, jax.debug.callback or "
        "jax.debug.print). It cannot be trained with DP-SGD: that code may keep state "
        "between examples (a running sum, a list of what it saw), which no trace can see, "
        "so one example could move every later update. Write the computation with "
        "jax.numpy or keras.ops (and debug outside the private training)."
    )


def _nested_constants(jaxpr) -> List[Tuple[str, np.ndarray]]:
    """The constants of nested closed jaxprs, and the literals of every equation."""
    found = []
    for eqn, where in _equations(jaxpr):
        for sub in _subjaxprs(eqn.params):
            if hasattr(sub, "consts"):
                found += [(f"{where}/constant", a) for _, a in _numeric(sub.consts)]
        literals = [v.val for v in eqn.invars if isinstance(v, jax_core.Literal)]
        found += [(f"{where}/constant", a) for _, a in _numeric(literals)]
    return found


def _numeric(values) -> List[Tuple[int, np.ndarray]]:
    """(index, array) of the concrete numeric values among `values` (tracers left out)."""
    found = []
    for i, value in enumerate(values):
        if isinstance(value, jax.core.Tracer):
            continue
        try:
            array = np.asarray(value)
        except (TypeError, ValueError):
            continue
        # Float scalars too: a one-column feature's statistic is one number.
        if array.dtype.kind in "biuf" and (array.size >= 2 or array.dtype.kind == "f"):
            found.append((i, array))
    return found
