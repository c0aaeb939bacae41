"""The Keras layers a model, a function or an object can reach, captured ones included.

A layer's state reaches the computation it is called from whether or not it
is tracked by the model: a `Lambda` or a custom layer that calls a
module-level `Normalization`, an augmenter given as a plain function that
closes over one, a loss that standardizes with adapted statistics. Checks
that must see every layer whose state enters the per-example computation
(`provenance.check`) walk what the Python objects refer to: the layers a
model tracks, the functions of `Lambda` layers, the methods of user-defined
layer classes, and from each function its closure, its defaults, the globals
its code names (and those names looked up on user modules it names), bound
`self`, `functools.partial` arguments, `tf.function` wrappers, containers and
the attributes of user-defined objects and classes (class attributes too).

What it cannot see: a layer reached through computed names (`getattr` with
a string built at run time, `globals()[...]`) or through library objects it
does not open (Keras, TensorFlow, NumPy internals).
"""

import functools
import inspect
import types
from typing import Any, Iterable, List

import keras
import numpy as np

from tan_keras import _keras_internals

# Objects of these packages are not opened (other than Keras layers).
_LIBRARIES = {"builtins", "keras", "tensorflow", "numpy", "jax", "scipy", "absl", "tan_keras"}
# A bound on the objects visited, so that a function naming a huge user
# structure costs a bounded walk; past it the walk is refused, never cut short.
_MAX_VISITS = 20000
# Values that hold no reference to anything: not visited (a 25,000-word
# vocabulary list costs no visits).
_ATOMS = (str, bytes, bytearray, int, float, complex, bool, type(None), range, slice)
# Special methods of user classes that run when an object is called or read.
_CALLED_SPECIAL_METHODS = ("__call__", "__getattr__", "__getattribute__", "__getitem__")


def _library(obj: Any) -> bool:
    module = getattr(type(obj), "__module__", "") or ""
    return module.split(".")[0] in _LIBRARIES


def _library_module(module: types.ModuleType) -> bool:
    return module.__name__.split(".")[0] in _LIBRARIES


def _code_names(code: types.CodeType) -> List[str]:
    """Global and attribute names used by `code` and the functions defined in it."""
    names = list(code.co_names)
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            names.extend(_code_names(constant))
    return names


def reachable_layers(*roots: Any) -> List[keras.layers.Layer]:
    """Every Keras layer reachable from `roots`, each once, in the order found.

    Args:
      *roots: Models, layers, functions or other objects.

    Returns:
      The layers (nested ones included).

    Raises:
      ValueError: if the roots reach more than `_MAX_VISITS` objects (other
        than strings and numbers): a check that stopped there could miss a
        layer.
    """
    found: List[keras.layers.Layer] = []
    seen = set()
    pending: List[Any] = [root for root in roots if not _atom(root)]
    visits = 0
    while pending:
        obj = pending.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        visits += 1
        if visits > _MAX_VISITS:
            raise ValueError(
                f"Invalid model: the code it runs on the training data (layers, Lambda and "
                f"loss functions, augmenters, and what they refer to) reaches more than "
                f"{_MAX_VISITS} Python objects, so tan_keras cannot check that none of them "
                "is preprocessing state adapted on the training data. Hold large structures "
                "as NumPy arrays or strings, or keep them out of the functions the model "
                "calls (e.g. compute constants beforehand)."
            )
        pending.extend(ref for ref in _references(obj, found) if not _atom(ref))
    return found


def _atom(obj: Any) -> bool:
    """Whether `obj` can refer to nothing (a string, a number, an array of numbers)."""
    if isinstance(obj, _ATOMS):
        return True
    return isinstance(obj, (np.ndarray, np.generic)) and obj.dtype != object


def _references(obj: Any, found: List[keras.layers.Layer]) -> Iterable[Any]:
    """Records `obj` if it is a layer; returns what it refers to that may hold layers."""
    if isinstance(obj, keras.layers.Layer):
        found.append(obj)
        refs: List[Any] = list(_keras_internals.all_layers(obj))
        function = getattr(obj, "function", None)
        if isinstance(obj, keras.layers.Lambda) and callable(function):
            refs.append(function)
        refs.extend(_class_references(type(obj)))
        return refs
    if isinstance(obj, (list, tuple, set, frozenset)):
        return list(obj)
    if isinstance(obj, dict):
        return list(obj.values())
    if isinstance(obj, functools.partial):
        return [obj.func, *obj.args, *obj.keywords.values()]
    if inspect.ismethod(obj):
        return [obj.__self__, obj.__func__]
    wrapped = getattr(obj, "python_function", None) or getattr(obj, "__wrapped__", None)
    if inspect.isfunction(obj):
        return _function_references(obj) + ([wrapped] if wrapped is not None else [])
    if wrapped is not None:
        return [wrapped]
    if isinstance(obj, (types.ModuleType, type)) or _library(obj):
        return []
    # A user-defined object (a callable augmenter class): its attributes and
    # its class's methods.
    refs = list(getattr(obj, "__dict__", {}).values()) + _class_references(type(obj))
    # Values held in __slots__ (a dataclass with slots=True has no __dict__).
    for base in type(obj).__mro__:
        if base.__module__.split(".")[0] in _LIBRARIES:
            break
        slots = getattr(base, "__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if hasattr(obj, name):
                refs.append(getattr(obj, name))
    return refs


def _class_references(kind: type) -> List[Any]:
    """What user-defined classes in `kind`'s MRO hold: methods and class attributes."""
    refs: List[Any] = []
    for base in kind.__mro__:
        if base.__module__.split(".")[0] in _LIBRARIES:
            break
        # Methods may name global layers; a class attribute may be a layer.
        for name, value in vars(base).items():
            special = name.startswith("__") and name.endswith("__")
            if special and name not in _CALLED_SPECIAL_METHODS:
                continue
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            if isinstance(value, property):
                refs.extend((value.fget, value.fset))
                continue
            refs.append(value)
    return refs


def _function_references(function: types.FunctionType) -> List[Any]:
    refs: List[Any] = [cell.cell_contents for cell in (function.__closure__ or ()) if _filled(cell)]
    refs.extend(function.__defaults__ or ())
    refs.extend((function.__kwdefaults__ or {}).values())
    names = _code_names(function.__code__)
    module_globals = function.__globals__
    for name in names:
        if name not in module_globals:
            continue
        value = module_globals[name]
        if isinstance(value, types.ModuleType):
            if not _library_module(value):
                # `prep.norm(x)`: the attribute names of the code, looked up
                # on a user module it names.
                refs.extend(getattr(value, attr) for attr in names if hasattr(value, attr))
            continue
        refs.append(value)
    return refs


def _filled(cell) -> bool:
    """Whether a closure cell holds a value (a name assigned later may not yet)."""
    try:
        cell.cell_contents  # noqa: B018  (reading it is the test)
    except ValueError:
        return False
    return True
