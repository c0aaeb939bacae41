"""`private_adapt`: `Normalization.adapt` with a privacy guarantee, accounted in the ledger.

The mechanism is `tan_keras.mechanism.moments`; this module streams the
data through it, sets the statistics into the layer, records the release in
the privacy ledger of the layer's weights (so that every private model over
them composes it into its epsilon, `ledger.py`) and marks the layer as
privately adapted (so that the refusal of data-derived preprocessing state
lets it pass, `provenance.py`).
"""

import sys
from typing import Any, Iterator, Optional, Tuple

import keras
import numpy as np

from tan_keras import _keras_internals, _validate
from tan_keras.keras_dp import ledger as ledger_lib
from tan_keras.mechanism import moments, provenance
from tan_keras.privacy import releases

# Rows of an in-memory array handled at once (bounded float64 copies).
_ROWS_PER_PASS = 4096


def private_adapt(
    layer: keras.layers.Normalization,
    data: Any,
    *,
    lower: Any,
    upper: Any,
    noise_multiplier: float,
    noise_seed: Optional[int] = None,
) -> moments.PrivateStatistics:
    """Sets a `Normalization` layer's mean and variance from private data, with noise.

    Replaces `layer.adapt(data)` when `data` is private. Each value is
    clipped to the public bounds [lower, upper] and rescaled to u in [0, 1];
    each example (a row of `data`) contributes the means of u and u^2 over
    its own positions (the axes the layer reduces, other than the batch
    axis), for each of the layer's d features; the two sums over the
    examples get Gaussian noise of std noise_multiplier * sqrt(2d) on each
    coordinate, are divided by N and mapped back to a mean and a variance
    (`tan_keras.mechanism.moments`).

    Privacy claim. Under add/remove adjacency (one example of `data` added
    or removed), the noisy sums are the Gaussian mechanism of sensitivity
    sqrt(2d) (each example's contribution is a vector in [0, 1]^(2d)) with
    noise multiplier sigma = `noise_multiplier`: one
    `GaussianDpEvent(sigma)`. It is recorded in the privacy ledger of the
    layer's weights, so the epsilon of any private model over them
    (`model.privacy_ledger`, `PrivacyAccountant`) composes it with its
    training; call it before or after `make_private`, but before `compile`
    (as Keras's `adapt`: a compiled step keeps the statistics it was traced
    with). N, the number of examples in `data`, is treated as public (as
    `dataset_size` is for DP-SGD) and returned. The bounds must not depend
    on the private data. Each call is one more release. NaN values count as
    `lower`; values outside the bounds are clipped (bias, not leakage).

    Args:
      layer: A `keras.layers.Normalization` whose statistics were not given
        to its constructor (built or not; its batch axis must not be kept).
      data: The private examples: a numpy array or tensor [N, ...], or (on
        the TensorFlow backend) a batched `tf.data.Dataset` of them (of x,
        or of (x, ...) tuples).
      lower: Public lower bound of the values: a float, or an array
        broadcastable to the layer's statistics (one per kept position).
      upper: Public upper bound, alike, > lower everywhere.
      noise_multiplier: sigma > 0.
      noise_seed: None (default): noise from OS entropy. An integer makes the
        noise reproducible and the release NOT private against anyone who
        knows it (a `NotPrivateWarning` says so).

    Returns:
      The `moments.PrivateStatistics` set into the layer: mean, variance,
      the std of the noise on the mean, N and sigma.

    Raises:
      ValueError: on a bad argument (before any data is read), or if the
        layer's weights belong to two private models that are still
        training with separate ledgers.
    """
    _check_normalization(layer)
    sigma = _validate.positive("noise_multiplier", noise_multiplier)
    shape, batches = _batches(data)
    keep, reduce = _build(layer, shape)
    features = tuple(shape[axis] for axis in keep)
    low = _bound("lower", lower, features)
    high = _bound("upper", upper, features)
    if np.any(high <= low) or not np.all(np.isfinite(high - low)):
        raise _validate.invalid(
            "upper",
            "bounds greater than `lower` everywhere, by a finite width",
            upper,
            f"Received: lower={lower!r}",
        )
    rng = moments.noise_generator(noise_seed)
    # Found before any data is read: a conflict fails before the release.
    ledger = ledger_lib.ledger_of(layer.weights) or ledger_lib.PrivacyLedger()

    broadcast = [shape[axis] if axis in keep else 1 for axis in range(len(shape))]
    low_b, high_b = low.reshape(broadcast), high.reshape(broadcast)
    example_axes = tuple(axis for axis in reduce if axis != 0)
    total = moments.ClippedMoments(np.zeros(features), np.zeros(features), 0)
    for batch in batches:
        _check_batch(batch, shape, keep)
        total = total + moments.clipped_moments(batch, low_b, high_b, example_axes)
    statistics = moments.release(total, low, high, sigma, rng)

    # The noise was drawn: the release is recorded before anything else.
    ledger.record_release(releases.Mechanism("gaussian", sigma))
    ledger_lib.bind(ledger, layer.weights)
    ledger_lib.attach(layer, ledger)
    layer.adapt_mean.assign(statistics.mean.astype(np.float32))
    layer.adapt_variance.assign(statistics.variance.astype(np.float32))
    layer.finalize_state()
    # A copy of the released statistics (Normalization(mean=..., variance=...)
    # in another model, a constant in a custom layer) brings the release.
    ledger_lib.remember([layer.adapt_mean, layer.adapt_variance], ledger, unless={})
    provenance.mark(
        layer,
        provenance.PRIVATE,
        f"private_adapt: Gaussian mechanism, noise_multiplier={sigma:g}, N={statistics.count}",
    )
    return statistics


def _check_normalization(layer) -> None:
    if not isinstance(layer, keras.layers.Normalization):
        raise _validate.invalid("layer", "a keras.layers.Normalization layer", layer)
    if layer.input_mean is not None:
        raise _validate.invalid(
            "layer",
            "a Normalization layer without `mean` and `variance` given to its constructor",
            layer.name,
            "Its statistics are fixed: there is nothing to adapt",
        )


def _batches(data) -> Tuple[Tuple, Iterator[np.ndarray]]:
    """(shape of the data, with None for the batch axis of a dataset; its batches)."""
    # TensorFlow only where it is loaded already: on the JAX backend the
    # data are arrays (a tf.data pipeline exists only where TF is installed).
    tf = sys.modules.get("tensorflow")
    if tf is not None and isinstance(data, tf.data.Dataset):
        spec = data.element_spec
        spec = spec[0] if isinstance(spec, tuple) else spec
        numeric = isinstance(spec, tf.TensorSpec) and (
            spec.dtype.is_floating or spec.dtype.is_integer
        )
        if not numeric or spec.shape.rank is None:
            raise _validate.invalid(
                "data", "a dataset of numbers of known rank (or of tuples whose first is)", spec
            )
        if spec.shape.rank == 1:
            # As Keras's adapt: elements of rank 1 are single examples.
            data = data.batch(128)
            spec = tf.TensorSpec([None, *spec.shape], spec.dtype)

        def from_dataset():
            for element in data:
                element = element[0] if isinstance(element, tuple) else element
                yield np.asarray(element)

        return tuple(spec.shape), from_dataset()
    if isinstance(data, np.ndarray) or keras.ops.is_tensor(data):
        array = keras.ops.convert_to_numpy(data)
        if array.ndim < 1 or array.dtype.kind not in "biuf":
            raise _validate.invalid(
                "data", "numbers with a batch axis: an array [N, ...]", array.shape
            )

        def from_array():
            for start in range(0, len(array), _ROWS_PER_PASS):
                yield array[start : start + _ROWS_PER_PASS]

        return array.shape, from_array()
    raise _validate.invalid(
        "data", "a numpy array, a tensor or a batched tf.data.Dataset", type(data).__name__
    )


def _build(layer, shape) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Builds `layer` for data of `shape` if needed; returns its (kept, reduced) axes."""
    built_for = _keras_internals.normalization_input_shape(layer)
    if built_for is None:
        try:
            layer.build(shape)
        except ValueError as err:
            raise _validate.invalid(
                "data", f"data the layer `{layer.name}` accepts", shape
            ) from err
    keep, reduce = _keras_internals.normalization_axes(layer)
    built_for = _keras_internals.normalization_input_shape(layer)
    if len(built_for) != len(shape) or any(shape[axis] != built_for[axis] for axis in keep):
        raise _validate.invalid(
            "data",
            f"examples of the shape the layer `{layer.name}` was built for ({built_for})",
            shape,
        )
    if 0 in keep:
        raise _validate.invalid(
            "layer",
            "a Normalization whose kept axes exclude the batch axis (axis 0)",
            f"axis={layer.axis} for data of shape {shape}",
            "Give each example its own axis: data of shape [N, ...]",
        )
    return keep, reduce


def _bound(name: str, value: Any, features: Tuple[int, ...]) -> np.ndarray:
    expected = f"a finite float or an array of them broadcastable to {features}"
    try:
        array = np.asarray(value, np.float64)
        array = np.broadcast_to(array, features).copy()
    except (TypeError, ValueError) as err:
        raise _validate.invalid(name, expected, value) from err
    if not np.all(np.isfinite(array)):
        raise _validate.invalid(name, expected, value)
    return array


def _check_batch(batch: np.ndarray, shape: Tuple, keep: Tuple[int, ...]) -> None:
    # A batch of another shape would be summed against the wrong bounds.
    if batch.ndim != len(shape) or any(batch.shape[axis] != shape[axis] for axis in keep):
        raise _validate.invalid(
            "data", f"batches of shape {shape} on the kept axes {keep}", batch.shape
        )
