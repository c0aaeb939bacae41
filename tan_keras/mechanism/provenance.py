"""Preprocessing state computed from data: refused unless public or privately adapted.

Keras tutorials adapt preprocessing layers on the training set
(`norm = Normalization(); norm.adapt(x_train)`). The adapted statistics
(a mean and variance, bin boundaries, a vocabulary) are then part of the
model: saved with it, without noise. Computed on the private training set,
they are a release of that data that no epsilon covers. So a private model
refuses, when it is built and at every `fit` (a layer may be adapted after
`make_private`), any layer whose state came from data:

* `Normalization` whose mean and variance were not given to its constructor
  and are not the initial 0 and 1;
* `Discretization` whose bin boundaries were adapted (`num_bins`);
* `IntegerLookup`, `StringLookup`, `TextVectorization` whose vocabulary was
  not given as `vocabulary=` (adapted, or set later).

unless the layer carries a mark that vouches for its current state:
`mark_public(layer, reason)` (the user declares it was adapted on public
data) or `private_adapt` (its statistics were released with noise and
accounted in the ledger). A mark holds a fingerprint of the state it
vouches for: a layer adapted again after it is refused again. Marks travel
with a saved private model (`DPKerasModel.get_config`), keyed by the
layer's path of names.
"""

import contextlib
import contextvars
import gc
import hashlib
from typing import Any, Dict, Iterator, NamedTuple, Optional

import keras
import numpy as np

from tan_keras import _keras_internals, _validate
from tan_keras.mechanism import captures, data_copies

PUBLIC = "public"
PRIVATE = "private"
# The key of the marks in DPKerasModel.get_config.
CONFIG_KEY = "preprocessing_provenance"

_ATTRIBUTE = "_tan_keras_provenance"
_VOCABULARIES = (
    keras.layers.TextVectorization,
    keras.layers.IntegerLookup,
    keras.layers.StringLookup,
)
_STATEFUL = (keras.layers.Normalization, keras.layers.Discretization, *_VOCABULARIES)


class Mark(NamedTuple):
    """Who vouches for a layer's state, and for which state.

    Attributes:
      provenance: PUBLIC (declared by the user) or PRIVATE (`private_adapt`).
      reason: The user's reason (PUBLIC), or a description of the release.
      fingerprint: A hash of the state the mark vouches for.
    """

    provenance: str
    reason: str
    fingerprint: str


def data_state(layer: Any) -> Optional[str]:
    """What of `layer`'s state was computed from data, in words, or None.

    Args:
      layer: Any layer.

    Returns:
      None for a layer without such state (or a preprocessing layer whose
      state was given to its constructor, or never set, and is no copy of
      an adapted layer's: `data_copies`).
    """
    adapted = _adapted_state(layer)
    if adapted is not None:
        return adapted
    # Copies are recognised among the states `discover_adapted` registered.
    if isinstance(layer, keras.layers.Normalization) and layer.input_mean is not None:
        return data_copies.copied_statistics([layer.input_mean, layer.input_variance], layer)
    if isinstance(layer, keras.layers.Discretization) and layer.bin_boundaries is not None:
        return data_copies.copied_statistics([layer.bin_boundaries], layer)
    if isinstance(layer, _VOCABULARIES) and _keras_internals.vocabulary_given(layer):
        return data_copies.copied_vocabulary(layer)
    return None


# Whether `discover_adapted` has looked through the live objects.
_DISCOVERED = False


def discover_adapted() -> None:
    """Registers the state of every live adapted layer with `data_copies`, vouched or not.

    `data_copies` hears of `adapt` calls made once it is imported; a layer
    adapted before any tan_keras module that needs it was loaded is found
    here, among the live objects. Once: every later `adapt` is heard.
    """
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    for obj in gc.get_objects():
        # type(), not isinstance(): isinstance reads `__class__`, which some
        # live objects compute (TFDS's lazy builder proxies log a warning).
        if not issubclass(type(obj), _STATEFUL) or _adapted_state(obj) is None:
            continue
        data_copies.register_adapted(obj)
        vouched = mark_of(obj)
        if vouched is not None and vouched.fingerprint == fingerprint(obj):
            data_copies.vouch(obj, vouched.provenance)


def _adapted_state(layer: Any) -> Optional[str]:
    if isinstance(layer, keras.layers.Normalization):
        if layer.input_mean is not None or not hasattr(layer, "adapt_mean"):
            return None
        mean = keras.ops.convert_to_numpy(layer.adapt_mean)
        variance = keras.ops.convert_to_numpy(layer.adapt_variance)
        if np.all(mean == 0) and np.all(variance == 1):
            return None
        return "its mean and variance were set by `adapt` (not given to its constructor)"
    if isinstance(layer, keras.layers.Discretization):
        if layer.num_bins is None or layer.bin_boundaries is None:
            return None
        return "its bin boundaries were computed by `adapt` (not given as `bin_boundaries=`)"
    if isinstance(layer, _VOCABULARIES):
        if _keras_internals.vocabulary_given(layer) is not False:
            return None
        if not layer.get_vocabulary(include_special_tokens=False):
            return None
        return "its vocabulary was not given as `vocabulary=` (adapted, or set later)"
    return None


def fingerprint(layer: Any) -> str:
    """A hash of the state `data_state` looks at (hex digest)."""
    digest = hashlib.sha256(type(layer).__name__.encode())
    if isinstance(layer, keras.layers.Normalization):
        for name in ("adapt_mean", "adapt_variance"):
            if hasattr(layer, name):
                value = keras.ops.convert_to_numpy(getattr(layer, name))
                digest.update(np.asarray(value, np.float32).tobytes())
    elif isinstance(layer, keras.layers.Discretization):
        digest.update(np.asarray(layer.bin_boundaries or [], np.float64).tobytes())
    elif isinstance(layer, _VOCABULARIES):
        for token in layer.get_vocabulary():
            token = token if isinstance(token, (str, bytes)) else str(token)
            digest.update(token.encode() if isinstance(token, str) else token)
            digest.update(b"\x00")
        # tf-idf weights are adapted document frequencies: re-adapting on other
        # data can change them and leave the vocabulary as it was.
        idf = getattr(getattr(layer, "_lookup_layer", layer), "idf_weights", None)
        if idf is not None:
            digest.update(np.asarray(keras.ops.convert_to_numpy(idf), np.float64).tobytes())
    return digest.hexdigest()


def _check_layer(name: str, layer: Any) -> None:
    if not isinstance(layer, _STATEFUL):
        raise _validate.invalid(
            name,
            "a Keras Normalization, Discretization, IntegerLookup, StringLookup or "
            "TextVectorization layer",
            layer,
        )


def mark(layer: Any, provenance: str, reason: str) -> None:
    """Vouches for `layer`'s current state (see `mark_public`, `private_adapt`)."""
    object.__setattr__(layer, _ATTRIBUTE, Mark(provenance, reason, fingerprint(layer)))
    data_copies.vouch(layer, provenance)


def mark_public(layer: keras.layers.Layer, reason: str) -> keras.layers.Layer:
    """Declares that a preprocessing layer's adapted state came from public data.

    A private model refuses a layer whose statistics or vocabulary were
    adapted (see `tan_keras.mechanism.provenance`): computed on the private
    training set, they would be released without noise. Call this after
    adapting the layer on data that is public (not the training set, nor
    anything derived from it); you vouch for it, tan_keras cannot check it.
    The declaration covers the layer's current state only (adapting it
    again voids it) and is saved with the private model.

    Args:
      layer: A `Normalization`, `Discretization`, `IntegerLookup`,
        `StringLookup` or `TextVectorization` layer.
      reason: Where its state came from, e.g. "adapted on ImageNet's
        published channel statistics" (a non-empty string, saved with the model).

    Returns:
      `layer`.

    Raises:
      ValueError: if `layer` is not such a layer or `reason` is empty.
    """
    _check_layer("layer", layer)
    if not isinstance(reason, str) or not reason.strip():
        raise _validate.invalid(
            "reason", "a non-empty string saying where the layer's state came from", reason
        )
    mark(layer, PUBLIC, reason.strip())
    return layer


def mark_of(layer: Any) -> Optional[Mark]:
    """The mark `layer` carries, or None."""
    return getattr(layer, _ATTRIBUTE, None)


def check(*roots: Any) -> None:
    """Refuses preprocessing state computed from data that no mark vouches for.

    Every layer the roots reach is checked, not only those a model tracks: a
    `Lambda`, a custom layer, an augmenter function or a loss that calls an
    adapted layer held elsewhere (`captures.reachable_layers`).

    Args:
      *roots: The private model, and what else runs on its private data
        (an augmenter, a loss).

    Raises:
      ValueError: naming the first such layer, why it is refused and the
        ways out.
    """
    layers = [layer for layer in captures.reachable_layers(*roots) if isinstance(layer, _STATEFUL)]
    if layers:
        discover_adapted()
    # A TextVectorization's own StringLookup is checked with it, whichever the
    # walk met first.
    inside = {
        id(inner)
        for layer in layers
        for inner in _keras_internals.all_layers(layer)
        if inner is not layer
    }
    for layer in layers:
        if id(layer) in inside:
            continue
        state = data_state(layer)
        if state is None:
            continue
        vouched = mark_of(layer)
        if vouched is not None and vouched.fingerprint == fingerprint(layer):
            continue
        raise ValueError(_refusal(layer, state, vouched))


def _refusal(layer, state: str, stale: Optional[Mark]) -> str:
    kind = type(layer).__name__
    text = f"Layer `{layer.name}` ({kind}) holds state computed from data: {state}."
    if stale is not None:
        declared = "declared public" if stale.provenance == PUBLIC else "privately adapted"
        text += f" It changed since it was {declared} (adapted again?)."
    text += (
        " If that data was the private training set, this state is a release of it "
        "that epsilon does not cover: it ships inside the model, without noise. "
    )
    public = (
        "(2) if it was adapted on public data, declare it: "
        "tan_keras.mark_public(layer, reason=...); "
    )
    if isinstance(layer, keras.layers.Normalization):
        return text + (
            "Either (1) give the statistics to the constructor, computed on public data: "
            f"Normalization(mean=..., variance=...); {public}or (3) adapt it privately: "
            "tan_keras.private_adapt(layer, data, lower=..., upper=..., "
            "noise_multiplier=...), which adds its release to the model's epsilon."
        )
    if isinstance(layer, keras.layers.Discretization):
        return text + (
            "Either (1) give the boundaries, computed on public data: "
            f"Discretization(bin_boundaries=...); {public}or (3) compute them with a "
            "differentially private quantile mechanism and give them as bin_boundaries "
            "(tan_keras has no private adapt for boundaries)."
        )
    return text + (
        f"Either (1) give the vocabulary, built from public data: {kind}(vocabulary=...); "
        f"{public}or (3) build it with a differentially private mechanism (private "
        "partition selection) and give it as vocabulary= (tan_keras has no private "
        "adapt for vocabularies)."
    )


def _layers_by_path(model: keras.layers.Layer) -> Dict[str, Any]:
    found: Dict[str, Any] = {}

    def walk(layer, prefix):
        for child in _keras_internals.child_layers(layer):
            path = prefix + child.name
            if path not in found:
                found[path] = child
                walk(child, path + "/")

    walk(model, "")
    return found


def to_config(model: keras.Model) -> Dict[str, Dict[str, str]]:
    """The marks of `model`'s layers, keyed by path of layer names (JSON-ready)."""
    return {
        path: mark_of(layer)._asdict()
        for path, layer in _layers_by_path(model).items()
        if mark_of(layer) is not None
    }


_RESTORING: contextvars.ContextVar = contextvars.ContextVar("tan_keras_marks", default=None)


@contextlib.contextmanager
def restoring(marks: Optional[Dict[str, Dict[str, str]]]) -> Iterator[None]:
    """Within the block, `apply_restored` puts `marks` (from `to_config`) back on a model."""
    token = _RESTORING.set(marks)
    try:
        yield
    finally:
        _RESTORING.reset(token)


def apply_restored(model: keras.Model) -> None:
    """Puts the marks of a model being loaded (`restoring`) back on its layers.

    Raises:
      ValueError: if a mark names a layer the model does not have.
    """
    marks = _RESTORING.get()
    if not marks:
        return
    layers = _layers_by_path(model)
    for path, fields in marks.items():
        layer = layers.get(path)
        if layer is None:
            raise _validate.invalid(
                CONFIG_KEY,
                "marks of layers of this model",
                path,
                "The saved model's layers do not match its config",
            )
        try:
            restored = Mark(*(str(fields[name]) for name in Mark._fields))
        except (KeyError, TypeError) as err:
            raise _validate.invalid(
                CONFIG_KEY, f"marks with fields {Mark._fields}", fields
            ) from err
        object.__setattr__(layer, _ATTRIBUTE, restored)
