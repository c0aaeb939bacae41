"""Private data held inside a computation: copies of training rows and of adapted state.

The provenance check (`provenance.py`) refuses preprocessing layers whose
state came from data, and follows the Python references a model, an
augmenter or a loss holds. Data can reach a computation without any layer
carrying it where that walk looks: a custom layer or an augmenter that
closes over the training array (a pool of examples to blend with, RBF
centres drawn from the data), an adapted `Normalization` reached through an
object the walk does not open, or a layer built with statistics or a
vocabulary copied from an adapted layer (`Normalization(mean=adapted.mean)`,
`IntegerLookup(vocabulary=adapted.get_vocabulary())`). Every such copy
reaches every example's gradient without noise and is saved with the model.

So what the computation holds is looked at after tracing it, whatever
reference led there: every constant of the traced graph (captured tensors
and `Const` nodes, those of nested function bodies too) and every variable
it reads. A value is refused when

* one of its rows is a row of a training array this process handed to
  `make_poisson_dataset` (`register_rows`; the model's own `fit(x, y)` goes
  through it), compared exactly after conversion to float64; or
* it is the state a Keras preprocessing layer's `adapt` computed
  (`register_adapted`, installed on `adapt` at import), unless the
  layer was then declared public or adapted privately (`vouch`, called by
  `provenance.mark`): a privately released value is followed by the privacy
  ledger instead (`ledger.recall` looks up `value_fingerprints`); or
* it is a statistic of the training data: per-feature vectors (rtol 1e-4),
  or values each a single column's statistic (mean, variance, std, median
  and percentiles, extremes, sums, reciprocals; rtol 1e-5), float scalars
  included: keras.io's structured data gives each feature as its own
  [N, 1] column, whose mean is one number. Numbers a person writes (whole,
  p/q with q <= 16, four significant digits, or one over such: 0.5, 255,
  1/255) are never taken for statistics.

Validation data is compared by whole records (`holds_training_records`,
called by `held_out.py`): every numeric input of a row together, so that a
dict of one-column features, or one [N, 1] feature, copied from the
training records is refused; matches are weighed against the rate at which
the training records repeat among themselves, so held-out data of a few
categories is not taken for a copy.

Vocabularies live in lookup tables, not in the traced graph: a lookup layer
whose `vocabulary=` equals an adapted, unvouched vocabulary is refused by
`copied_vocabulary` (called from `provenance.data_state`).

What it cannot see: values changed on the way (scaled, shuffled within a
row, cast to a lower precision), rows of data never handed to
`make_poisson_dataset` (a `tf.data` source of your own), constant rows
(every value equal), which are too common to tell apart, and validation
records that chance could explain (one copied row among a thousand
training rows, a copy of data with few distinct records).

TensorFlow is imported on its backend only: the functions that read its
graphs (`graph_values`, `check_function`) serve the TensorFlow route, the
rest the JAX backend too (`jax_dp/training_rows.py`, `jax_dp/traced_loss.py`).
"""

import hashlib
import re
import weakref
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Tuple

import keras
import numpy as np

from tan_keras._fingerprints import value_fingerprint

# TensorFlow only on its backend: the graph functions (`graph_values`,
# `check_function`) serve the TensorFlow route, the rest the JAX one too.
_TENSORFLOW = keras.backend.backend() == "tensorflow"
if _TENSORFLOW:
    import tensorflow as tf

# Constants smaller than this are not looked at (shapes, axes), unless a
# float: a float scalar is matched against the single-column statistics
# (`_scalar_statistic`), never against rows.
_MIN_ELEMENTS = 2
# Per-column statistics are recorded as scalars for arrays of at most this
# many columns (structured data; per-pixel scalars would match by chance).
_MAX_SCALAR_COLUMNS = 64
# Scalars match a statistic within this relative tolerance: Keras `adapt`,
# numpy and jax.numpy in float32 land within 2e-7 of the float64 statistic
# (measured, N up to 1e5); vectors use 1e-4, their elements matching jointly.
_SCALAR_RTOL = 1e-5
# Statistics of larger arrays are computed without sorting or copying them
# (moments and extremes only).
_MAX_SORTED_ELEMENTS = 10_000_000
# Arrays with more elements are weights or data, not statistics: their
# elements are not matched one by one.
_MAX_SCALARS_CHECKED = 4096
# Joined records (every numeric input of a row together) are recorded up to
# this width; wider inputs are matched leaf by leaf (`_ROWS`).
_MAX_RECORD_WIDTH = 4096
# Rows of a training array are recognised by a random projection in float64
# (exact equality of identical rows; distinct rows collide with probability
# ~0 for real data).
_PROJECTION_SEED = 20261206
# A value is cut into at most this many rows of a registered width.
_MAX_ROWS_CHECKED = 2_000_000


class _Adapted(NamedTuple):
    layer: str
    owner: "weakref.ref"


# Training rows by row width: the sorted projections of the registered rows.
_ROWS: Dict[int, np.ndarray] = {}
# Per-feature (and, for images, per-channel) statistics of registered
# training arrays (`_statistics`: name, vector), and the values of their
# columns of categories with their counts.
# Keyed by a fingerprint: the same arrays given to every fit are kept once.
_STATISTICS: Dict[int, Tuple[str, np.ndarray]] = {}
_CATEGORIES: Dict[int, Dict[str, int]] = {}
# Fingerprints (with the shape) of the arrays registered so far.
_REGISTERED: set = set()
# A column with more distinct values is no column of categories.
_MAX_CATEGORIES = 100_000
# A column of texts with more distinct words is not recorded.
_MAX_WORDS = 1_000_000
# Tells a column's words from its whole values in `_CATEGORIES`.
_WORDS_KEY = 0x5745_4F52_4453
# What TextVectorization's default standardization strips (its DEFAULT_STRIP_REGEX).
_STRIPPED = re.compile(r'[!"#$%&()\*\+,-\./:;<=>?@\[\\\]^_`{|}~\']')
# A vocabulary drawn from the training values that holds a value seen fewer
# times than this tells whether the few examples holding it are in the set.
_RARE = 10
# Adapted state: value fingerprint -> where it came from; vocabulary digest likewise.
_ADAPTED: Dict[int, _Adapted] = {}
_VOCABULARIES: Dict[int, _Adapted] = {}
# id(layer) -> fingerprints it registered (to vouch for them).
_BY_LAYER: Dict[int, List[Tuple[Dict[int, _Adapted], int]]] = {}
_VOUCHED: Dict[int, str] = {}
# The values of vouched layers' state (as float64), by fingerprint: a graph
# holds them reshaped, so a statistic they equal is matched by value.
_VOUCHED_VALUES: Dict[int, np.ndarray] = {}
# Single-column statistics (a column's mean, variance, quantiles...) of the
# registered arrays: (value, name) by registration, and the same sorted for
# lookup (rebuilt when stale).
_SCALARS: Dict[str, Tuple[np.ndarray, List[str]]] = {}
_SCALAR_INDEX: List[Any] = []
# Whole training records (every numeric input of a row, joined in the order
# of `keras.tree.flatten`), by registration: (width, sorted keys, the rate
# at which a held-out record matches one by chance). Keys are projections
# for records of two numbers or more, the values themselves for one.
# Kept for validation data only (`holds_training_records`).
_RECORDS: Dict[str, Tuple[int, np.ndarray, float]] = {}
# Validation rows matching training records count as a copy when chance
# explains that many with probability under exp(-_RECORD_EVIDENCE) (1e-3).
_RECORD_EVIDENCE = np.log(1000.0)


def _projection(width: int) -> np.ndarray:
    return np.random.default_rng([_PROJECTION_SEED, width]).normal(size=width)


def _numeric(value: Any) -> Optional[np.ndarray]:
    array = np.asarray(value)
    if array.dtype.kind not in "biuf" or not array.size:
        return None
    if array.size < _MIN_ELEMENTS and array.dtype.kind != "f":
        return None
    return array


def register_rows(features: Any) -> None:
    """Remembers the rows of training arrays, so that no computation may hold a copy.

    Also each feature's usual statistics (`_statistics`: constants equal to
    them are computed from the training set), each column's own statistics
    as scalars (`_scalar_statistics`: a one-column feature's mean is one
    number), the values of each column of categories with their counts (a
    vocabulary made of the column's values, rare ones included, is the
    training set's: keras.io's `IntegerLookup(vocabulary=sorted(train[col].unique()))`),
    and the whole records (`_register_records`: validation data holding them
    is refused).

    Args:
      features: An array of [N, ...] examples, or a list/dict of such arrays.
    """
    _register_records(features)
    for path, array in keras.tree.flatten_with_path(features):
        array = np.asarray(keras.ops.convert_to_numpy(array))
        digest = hashlib.blake2b(f"{array.dtype}{array.shape}".encode(), digest_size=8)
        digest.update(np.ascontiguousarray(array).data if array.dtype != object else b"")
        fingerprint = digest.hexdigest() if array.dtype != object else None
        if fingerprint is not None and fingerprint in _REGISTERED:
            continue  # the same arrays given to every fit: recorded once
        if fingerprint is not None:
            _REGISTERED.add(fingerprint)
        if array.ndim >= 1 and len(array) and (array.ndim == 1 or array[0].size == 1):
            _register_categories(array.reshape(-1))
        array = _numeric(array)
        if array is None or array.ndim < 1 or not len(array):
            continue
        flat = array.reshape(len(array), -1).astype(np.float64)
        groups = [flat]
        if array.ndim >= 3:
            # Per channel, as Normalization(axis=-1) on images computes them.
            groups.append(array.reshape(-1, array.shape[-1]).astype(np.float64))
        for group in groups:
            for name, vector in _statistics(group):
                _STATISTICS[value_fingerprint(vector)] = (name, vector)
        _register_scalars(fingerprint, _input_name(path), flat, groups[1:])
        if array.ndim < 2:
            continue
        rows = array.reshape(len(array), -1).astype(np.float64)
        width = rows.shape[1]
        if width < 2:
            continue
        rows = rows[np.any(rows != rows[:, :1], axis=1)]
        known = _ROWS.get(width, np.empty(0))
        _ROWS[width] = np.unique(np.concatenate([known, rows @ _projection(width)]))


def _input_name(path: Tuple[Any, ...]) -> str:
    return "input `" + "/".join(str(key) for key in path) + "`" if path else "the input"


def _records(features: Any) -> Optional[np.ndarray]:
    """[N, width] float64: every numeric input of each row, joined; None if not arrays.

    Inputs that are not numbers (strings) are left out, in the training
    records and in the validation records alike.
    """
    columns = []
    for leaf in keras.tree.flatten(features):
        if not hasattr(leaf, "__array__") and not isinstance(leaf, (list, tuple)):
            return None
        try:
            array = np.asarray(keras.ops.convert_to_numpy(leaf))
        except (TypeError, ValueError):
            return None
        if array.dtype.kind not in "biuf" or array.ndim < 1:
            continue
        columns.append(array.reshape(len(array), -1).astype(np.float64))
    if not columns or any(len(c) != len(columns[0]) for c in columns):
        return None
    width = sum(c.shape[1] for c in columns)
    if not len(columns[0]) or not width or width > _MAX_RECORD_WIDTH:
        return None
    return np.concatenate(columns, axis=1)


def _register_records(features: Any) -> None:
    """Remembers the training records, all inputs of a row together, for validation data.

    keras.io's structured data gives each feature as its own [N, 1] column:
    no array holds a row of more than one number, so a copy is told by the
    whole record. Records of one number in all are compared by value, whole
    numbers left out (equal ages tell no copy apart). With each, the rate
    at which a fresh record of the same data matches a training record by
    chance, estimated from the training records themselves (the fraction
    that repeat another, leave one out, plus its error and 1/N).
    """
    leaves = keras.tree.flatten(features)
    if len(leaves) == 1 and int(np.prod(np.shape(leaves[0])[1:])) >= 2:
        return  # one array of rows: matched row by row (`_ROWS`)
    records = _records(features)
    if records is None:
        return
    key = hashlib.blake2b(records.tobytes(), digest_size=8).hexdigest() + str(records.shape)
    if key in _RECORDS:
        return
    keys = _record_keys(records)
    if len(keys) < 2:
        return
    _, counts = np.unique(keys, return_counts=True)
    n = len(keys)
    repeated = float(counts[counts > 1].sum()) / n
    rate = min(1.0, repeated + 2 * np.sqrt(repeated * (1 - repeated) / n) + 1.0 / n)
    _RECORDS[key] = (records.shape[1], np.unique(keys), rate)


def _record_keys(records: np.ndarray) -> np.ndarray:
    """One float per compared record: the value (one number), or a projection.

    Records of one whole number, and records whose numbers are all equal,
    are not compared (module doc: constant rows).
    """
    width = records.shape[1]
    if width == 1:
        values = records[:, 0]
        return values[np.isfinite(values) & (values != np.round(values))]
    rows = records[np.any(records != records[:, :1], axis=1)]
    return rows @ _projection(width)


def holds_training_records(features: Any) -> Optional[str]:
    """Whether the records of `features` (validation inputs) are training records.

    Every numeric input of a row is compared together, in the structure
    the training inputs had (a dict of one-column features: the whole
    record; one [N, 1] feature: its values, whole numbers left out). A
    copy is more matches than chance explains: the binomial tail at the
    registered chance rate (Chernoff bound) under 1e-3. A full copy, or a
    part of a few rows, is refused; held-out data of few distinct records
    (categories) is not.

    Returns:
      None, or how many validation rows repeat training records, in words.
    """
    records = _records(features)
    if records is None:
        return None
    width = records.shape[1]
    compared = None
    for known_width, known, rate in _RECORDS.values():
        if known_width != width:
            continue
        if compared is None:
            compared = _record_keys(records)
        matched = int(np.isin(compared, known).sum())
        if matched and _beyond_chance(matched, len(compared), rate):
            what = "hold a training value" if width == 1 else "are training records (all inputs)"
            return f"{matched} of its {len(records)} rows {what}"
    return None


def _beyond_chance(matched: int, compared: int, rate: float) -> bool:
    """Whether `matched` of `compared` exceeds chance at `rate` (tail under 1e-3)."""
    share = matched / compared
    if rate >= 1.0 or share <= rate:
        return False
    divergence = share * np.log(share / rate)
    if share < 1.0:
        divergence += (1 - share) * np.log((1 - share) / (1 - rate))
    return compared * divergence > _RECORD_EVIDENCE


def _register_scalars(key: str, name: str, flat: np.ndarray, channels: List[np.ndarray]) -> None:
    """Records the single-column statistics of an array, as scalars (`_scalar_statistics`).

    Each column's (for arrays of at most `_MAX_SCALAR_COLUMNS` columns),
    each channel's (images), and the whole array's.
    """
    found: List[Tuple[str, np.ndarray]] = []
    if flat.shape[1] == 1:
        found += _scalar_statistics(flat, lambda s: f"{s} of {name}")
    else:
        if flat.shape[1] <= _MAX_SCALAR_COLUMNS:
            found += _scalar_statistics(flat, lambda s: f"{s} of a column of {name}")
        found += _scalar_statistics(flat.reshape(-1, 1), lambda s: f"{s} of {name}, all values")
    for group in channels:
        if group.shape[1] <= _MAX_SCALAR_COLUMNS:
            found += _scalar_statistics(group, lambda s: f"{s} of a channel of {name}")
    if not found:
        return
    values = np.concatenate([vector for _, vector in found])
    names = [label for label, vector in found for _ in range(vector.size)]
    keep = np.isfinite(values) & ~_simple(values)
    entry = (values[keep], [label for label, k in zip(names, keep) if k])
    _SCALARS[key] = entry
    _SCALAR_INDEX.clear()


def _scalar_statistics(columns: np.ndarray, label) -> List[Tuple[str, np.ndarray]]:
    """What a preprocessing scalar is computed as from a column, per column of [n, width].

    Mean, variance and std (ddof 0 and 1: numpy's and pandas'), median
    and quantiles, extremes and range, sum and sum of squares, and the
    reciprocals used as scales.
    """
    if len(columns) < 2:
        return []
    if columns.size > _MAX_SORTED_ELEMENTS:
        return _large_scalar_statistics(columns, label)
    quantiles = np.quantile(columns, [0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99], axis=0)
    std, std1 = columns.std(axis=0), columns.std(axis=0, ddof=1)
    low, high = columns.min(axis=0), columns.max(axis=0)
    absmax = np.maximum(np.abs(low), np.abs(high))
    found = [
        ("mean", columns.mean(axis=0)),
        ("variance", columns.var(axis=0)),
        ("variance (ddof=1)", columns.var(axis=0, ddof=1)),
        ("std", std),
        ("std (ddof=1)", std1),
        ("minimum", low),
        ("maximum", high),
        ("absolute maximum", absmax),
        ("range", high - low),
        ("sum", columns.sum(axis=0)),
        ("sum of squares", np.square(columns).sum(axis=0)),
    ]
    found += [
        ("median" if q == 50 else f"{q}th percentile", v)
        for q, v in zip((1, 5, 10, 25, 50, 75, 90, 95, 99), quantiles)
    ]
    with np.errstate(divide="ignore", invalid="ignore"):
        found += [
            ("1 / std", 1 / std),
            ("1 / std (ddof=1)", 1 / std1),
            ("1 / absolute maximum", 1 / absmax),
            ("1 / range", 1 / (high - low)),
        ]
    return [(label(name), vector) for name, vector in found]


def _large_scalar_statistics(columns: np.ndarray, label) -> List[Tuple[str, np.ndarray]]:
    """The moments and extremes of a large array's columns, without copying it (no quantiles)."""
    n = len(columns)
    mean = columns.mean(axis=0)
    squares = np.einsum("ij,ij->j", columns, columns)
    variance = np.maximum(squares / n - mean**2, 0)
    low, high = columns.min(axis=0), columns.max(axis=0)
    absmax = np.maximum(np.abs(low), np.abs(high))
    found = [
        ("mean", mean),
        ("variance", variance),
        ("std", np.sqrt(variance)),
        ("minimum", low),
        ("maximum", high),
        ("absolute maximum", absmax),
        ("sum", mean * n),
    ]
    with np.errstate(divide="ignore", invalid="ignore"):
        found += [("1 / std", 1 / np.sqrt(variance)), ("1 / absolute maximum", 1 / absmax)]
    return [(label(name), vector) for name, vector in found]


def _simple(values: np.ndarray) -> np.ndarray:
    """Which values are numbers a person writes (whole, p/q with q <= 16, 4 digits, or 1/such).

    Such a statistic (a balanced binary column's mean of 0.5, a pixel
    maximum of 255) would match public constants (a dropout rate, a
    `Rescaling(1 / 255)`), so it is not recorded.
    """
    values = np.asarray(values, np.float64)
    simple = values == 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for candidate in (values, 1 / values):
            scaled = candidate[:, None] * np.arange(1, 17)
            simple |= np.any(np.abs(scaled - np.round(scaled)) <= 1e-6 * np.abs(scaled), axis=1)
            magnitude = np.abs(candidate)
            exponent = np.floor(np.log10(np.where(magnitude > 0, magnitude, 1)))
            digits = magnitude / 10.0 ** (exponent - 3)
            simple |= np.abs(digits - np.round(digits)) <= 1e-6 * digits
    return simple


def _scalar_index() -> Tuple[np.ndarray, List[str]]:
    if not _SCALAR_INDEX:
        values = [v for v, _ in _SCALARS.values()]
        names = [n for _, found in _SCALARS.values() for n in found]
        values = np.concatenate(values) if values else np.empty(0)
        order = np.argsort(values, kind="stable")
        _SCALAR_INDEX.extend([values[order], [names[i] for i in order]])
    return _SCALAR_INDEX[0], _SCALAR_INDEX[1]


def _scalar_statistic(flat: np.ndarray) -> Optional[str]:
    """The statistic a float value's elements are, when every one that is not simple is one.

    A scalar (`Normalization(mean=train["age"].mean())`) or a vector of
    single-column statistics (the means of a dict's one-column features,
    concatenated). Matched within `_SCALAR_RTOL`; values a person writes
    (`_simple`) are no evidence; elements equal to vouched state are excused.
    """
    known, names = _scalar_index()
    if not known.size or flat.size > _MAX_SCALARS_CHECKED:
        return None
    flat = flat[np.isfinite(flat)]
    flat = flat[~_simple(flat)] if flat.size else flat
    if not flat.size:
        return None
    position = np.clip(np.searchsorted(known, flat), 1, len(known) - 1) if len(known) > 1 else None
    if position is None:
        nearest = np.zeros(flat.size, int)
    else:
        left, right = known[position - 1], known[position]
        nearest = np.where(np.abs(flat - left) <= np.abs(flat - right), position - 1, position)
    close = np.abs(flat - known[nearest]) <= _SCALAR_RTOL * np.abs(known[nearest])
    if not np.all(close):
        return None
    if _VOUCHED_VALUES:
        vouched = np.concatenate(list(_VOUCHED_VALUES.values()))
        excused = np.array(
            [np.any(np.abs(vouched - v) <= _SCALAR_RTOL * abs(v)) for v in flat], bool
        )
        if np.all(excused):
            return None
        nearest = nearest[~excused]
    return names[int(nearest[0])]


def _statistics(columns: np.ndarray) -> List[Tuple[str, np.ndarray]]:
    """The usual per-column statistics of [n, width] values, and their reciprocals.

    Those a preprocessing constant is computed as by hand (a mean, a
    variance or std, a median, extremes; `1 / std`, `1 / max` for a
    scale). Vectors of one repeated value (a pixel range of 255 in every
    column) say nothing of the data and are left out, as are vectors of
    whole numbers (they match shapes, indices and one-hot constants by
    chance) and a width of 1 (a scalar would match public constants).
    """
    if columns.shape[1] < 2:
        return []
    std = columns.std(axis=0)
    absmax = np.abs(columns).max(axis=0)
    found = [
        ("per-feature mean", columns.mean(axis=0)),
        ("per-feature variance", columns.var(axis=0)),
        ("per-feature std", std),
        ("per-feature median", np.median(columns, axis=0)),
        ("per-feature minimum", columns.min(axis=0)),
        ("per-feature maximum", columns.max(axis=0)),
        ("per-feature absolute maximum", absmax),
    ]
    with np.errstate(divide="ignore", invalid="ignore"):
        found += [("1 / per-feature std", 1 / std), ("1 / per-feature maximum", 1 / absmax)]
    return [
        (name, vector)
        for name, vector in found
        if np.all(np.isfinite(vector))
        and np.any(vector != vector[0])
        and np.any(vector != np.round(vector))
    ]


def statistic_copied(array: np.ndarray) -> Optional[str]:
    """The name of the training statistic `array` equals, or None.

    A vector of per-feature statistics (rtol 1e-4), or values each a
    single column's statistic (`_scalar_statistic`, rtol `_SCALAR_RTOL`).
    """
    array = np.asarray(array)
    if array.dtype.kind != "f" or not array.size:
        return None
    flat = array.ravel().astype(np.float64)
    for name, vector in _STATISTICS.values():
        if vector.size == flat.size and np.allclose(flat, vector, rtol=1e-4, atol=0):
            return None if _vouched_value(flat) else name
    return _scalar_statistic(flat)


def _vouched_value(flat: np.ndarray) -> bool:
    return any(
        vouched.size == flat.size and np.allclose(flat, vouched, rtol=1e-4, atol=0)
        for vouched in _VOUCHED_VALUES.values()
    )


def _register_categories(column: np.ndarray) -> None:
    if column.dtype.kind not in "biuSUO":
        return
    if column.dtype.kind in "SO":
        column = np.asarray([_text(value) for value in column.tolist()])
    values, counts = np.unique(column.astype(str), return_counts=True)
    if len(values) <= _MAX_CATEGORIES:
        key = value_fingerprint(counts) ^ value_fingerprint(np.asarray(values))
        _CATEGORIES[key] = dict(zip(values.tolist(), counts.tolist()))
    if column.dtype.kind in "UO":
        _register_words(values.tolist(), counts.tolist())


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _register_words(texts: List[str], repeats: List[int]) -> None:
    """The words of a column of texts, each with the number of texts that hold it.

    A `TextVectorization(vocabulary=...)` made of the training texts' words
    names a word held by one text (review: a patient's name and diagnosis,
    shipped in the `.keras` file). Words are counted as split on white
    space and as `TextVectorization`'s default standardization makes them
    (lower case, punctuation stripped).
    """
    if not any(any(c.isspace() for c in text) for text in texts[:1000]):
        return  # no column of texts
    counts: Dict[str, int] = {}
    for text, repeat in zip(texts, repeats):
        words = set(text.split()) | set(_STRIPPED.sub("", text.lower()).split())
        for word in words:
            counts[word] = counts.get(word, 0) + repeat
    if len(counts) <= _MAX_WORDS:
        key = value_fingerprint(np.asarray(sorted(counts))) ^ _WORDS_KEY
        _CATEGORIES[key] = counts


def holds_training_rows(value: Any) -> bool:
    """Whether `value` (an array) holds a row of a registered training array, as rows or columns."""
    value = _numeric(np.asarray(value))
    if value is None:
        return False
    if _holds_training_rows(value):
        return True
    # Rows laid out as columns (a kernel initialised from examples).
    return value.ndim == 2 and _holds_training_rows(value.T)


def _holds_training_rows(value: np.ndarray) -> bool:
    flat = value.astype(np.float64).ravel()
    for width, known in _ROWS.items():
        if flat.size < width or flat.size % width or flat.size // width > _MAX_ROWS_CHECKED:
            continue
        rows = flat.reshape(-1, width)
        rows = rows[np.any(rows != rows[:, :1], axis=1)]
        if rows.size and np.any(np.isin(rows @ _projection(width), known)):
            return True
    return False


def _adapted_values(layer) -> List[Any]:
    if isinstance(layer, keras.layers.Normalization):
        return [getattr(layer, name, None) for name in ("adapt_mean", "adapt_variance")]
    if isinstance(layer, keras.layers.Discretization):
        return [layer.bin_boundaries]
    return []


def _vocabulary_digest(tokens: Iterable[Any]) -> int:
    digest = hashlib.blake2b(digest_size=8)
    for token in sorted(
        t if isinstance(t, bytes) else str(t).encode() for t in tokens if t is not None
    ):
        digest.update(token + b"\x00")
    return int.from_bytes(digest.digest(), "little")


def _vocabulary(layer) -> Optional[List[Any]]:
    get = getattr(layer, "get_vocabulary", None)
    if get is None:
        return None
    tokens = get(include_special_tokens=False)
    return [t.decode() if isinstance(t, bytes) else t for t in tokens]


def register_adapted(layer) -> None:
    """Remembers the state `adapt` just computed for `layer` (statistics, vocabulary)."""
    source = _Adapted(layer.name, weakref.ref(layer))
    # Vouching covers the layer's current state; copies of an earlier state
    # stay registered as they were. Values once vouched for stay vouched for,
    # whichever layer holds them (the same values come from the same data).
    entries = _BY_LAYER[id(layer)] = []
    for value in _adapted_values(layer):
        if value is None:
            continue
        array = _numeric(keras.ops.convert_to_numpy(value))
        if array is None:
            continue
        fingerprint = value_fingerprint(array)
        _ADAPTED[fingerprint] = source
        entries.append((_ADAPTED, fingerprint))
    tokens = _vocabulary(layer)
    if tokens:
        fingerprint = _vocabulary_digest(tokens)
        _VOCABULARIES[fingerprint] = source
        entries.append((_VOCABULARIES, fingerprint))


def vouch(layer, provenance: str) -> None:
    """Records that `layer`'s adapted state is declared public or was released privately."""
    for _, fingerprint in _BY_LAYER.get(id(layer), ()):
        _VOUCHED[fingerprint] = provenance
    # A layer adapted in another process (loaded with its mark) or on data
    # that shares a statistic with the training set (a shifted copy has its
    # variance) is matched by its current values.
    for value in _adapted_values(layer):
        array = _numeric(keras.ops.convert_to_numpy(value)) if value is not None else None
        if array is not None and array.dtype.kind == "f":
            _VOUCHED_VALUES[value_fingerprint(array)] = array.ravel().astype(np.float64)


def forget() -> None:
    """Forgets every registered row and adapted state (for tests that reuse data)."""
    tables = (
        _ROWS,
        _ADAPTED,
        _VOCABULARIES,
        _BY_LAYER,
        _VOUCHED,
        _VOUCHED_VALUES,
        _STATISTICS,
        _CATEGORIES,
        _SCALARS,
        _RECORDS,
    )
    for table in tables + (_REGISTERED,):
        table.clear()
    _SCALAR_INDEX.clear()


def _unvouched(table: Dict[int, _Adapted], fingerprint: int) -> Optional[_Adapted]:
    source = table.get(fingerprint)
    if source is None or fingerprint in _VOUCHED:
        return None
    return source


def copied_vocabulary(layer) -> Optional[str]:
    """Which adapted, unvouched layer `layer`'s given vocabulary copies, in words, or None."""
    tokens = _vocabulary(layer)
    if not tokens:
        return None
    source = _unvouched(_VOCABULARIES, _vocabulary_digest(tokens))
    if source is not None and source.owner() is not layer:
        return (
            f"its `vocabulary=` is the vocabulary layer `{source.layer}` computed by "
            "`adapt`, copied"
        )
    given = [str(t) for t in tokens]
    for counts in _CATEGORIES.values():
        # Any rare training value in it tells whether the few examples
        # holding it are in the training set, whatever else the vocabulary
        # holds: a review padded a vocabulary of the training values with
        # invented ones until they were not "mostly" the training set's
        # (the former rule), and it passed. A public list that happens to
        # hold a rare value is declared public (`mark_public`). The value is
        # not named: an error message is no place for a rare record.
        rare = [(counts[t], i) for i, t in enumerate(given) if counts.get(t, _RARE) < _RARE]
        if rare:
            count, entry = min(rare)
            return (
                f"its `vocabulary=` holds a value of a training column that only {count} "
                f"training example(s) hold (entry {entry} of the vocabulary): the vocabulary "
                "tells whether they are in the training set"
            )
    return None


def copied_statistics(values: Iterable[Any], layer) -> Optional[str]:
    """Which adapted, unvouched layer the `values` given to `layer` copy, in words, or None."""
    for value in values:
        array = np.asarray(value) if value is not None else None
        if array is None or array.dtype.kind not in "biuf" or not array.size:
            continue
        statistic = statistic_copied(array)
        if statistic is not None:
            return (
                "the statistics given to its constructor are the training data's own "
                f"(its {statistic})"
            )
        source = _unvouched(_ADAPTED, value_fingerprint(array))
        if source is not None and source.owner() is not layer:
            return (
                f"the statistics given to its constructor are those layer `{source.layer}` "
                "computed by `adapt`, copied"
            )
    return None


def graph_values(graph) -> List[Tuple[str, np.ndarray]]:
    """The numeric values a traced graph holds: captured tensors, constants, variables read.

    Args:
      graph: A `FuncGraph` (a concrete function's `.graph`).

    Returns:
      (name, array) pairs; values smaller than two elements are left out,
      but for float scalars (matched against single-column statistics).
    """
    values = []
    for external, internal in graph.captures:
        if internal.dtype == tf.resource:
            continue
        array = _numeric(_eager_value(external))
        if array is not None:
            values.append((internal.op.name, array))
    for variable in graph.variables:
        array = _numeric(_eager_value(variable))
        if array is not None:
            values.append((getattr(variable, "path", None) or variable.name, array))
    definition = graph.as_graph_def()
    nodes = list(definition.node)
    for function in definition.library.function:
        nodes.extend(function.node_def)
    for node in nodes:
        if node.op != "Const":
            continue
        tensor = node.attr["value"].tensor
        if tensor.dtype == tf.string.as_datatype_enum:
            continue
        array = _numeric(tf.make_ndarray(tensor))
        if array is not None:
            values.append((node.name, array))
    return values


def _eager_value(tensor) -> Optional[np.ndarray]:
    try:
        return np.asarray(tensor.numpy())
    except (AttributeError, TypeError, ValueError, tf.errors.OpError):
        return None


# How deep `held_arrays` looks into the lists, tuples and dicts an object holds.
_MAX_HELD_DEPTH = 3


def held_arrays(holder: Any, name: str) -> List[Tuple[str, np.ndarray]]:
    """The numeric arrays an object holds in its attributes, for `check_values`.

    A weight constraint or regularizer is an object called on the weight
    (`variable.constraint`, `variable.regularizer`): the arrays it was built
    with (a per-feature mean, a pool of examples) reach every update whether
    or not its trace shows them as constants. Arrays, tensors, variables and
    lists of numbers are read, inside lists, tuples and dicts too. Serves
    both backends (no TensorFlow).

    Args:
      holder: The object (its `__dict__` is read; none: nothing held).
      name: What it is, for the values' names (e.g. "dense/kernel.constraint").

    Returns:
      (name, array) pairs; values smaller than two elements are left out, but for floats.
    """
    found: List[Tuple[str, np.ndarray]] = []
    for attribute, value in sorted(getattr(holder, "__dict__", {}).items()):
        _collect_arrays(value, f"{name}.{attribute}", found, 0)
    return found


def _collect_arrays(value: Any, name: str, found: list, depth: int) -> None:
    if isinstance(value, (str, bytes)) or depth > _MAX_HELD_DEPTH:
        return
    if isinstance(value, dict):
        for key, item in value.items():
            _collect_arrays(item, f"{name}[{key!r}]", found, depth + 1)
        return
    if isinstance(value, (list, tuple)):
        array = _as_array(value)
        if array is not None:
            found.append((name, array))
            return
        for index, item in enumerate(value):
            _collect_arrays(item, f"{name}[{index}]", found, depth + 1)
        return
    if isinstance(value, float) and _simple(np.array([value]))[0]:
        return  # a setting a person writes (`MaxNorm(2.0)`), no statistic
    if hasattr(value, "__array__") or isinstance(value, (np.generic, float)):
        array = _as_array(value)
        if array is not None:
            found.append((name, array))


def _as_array(value: Any) -> Optional[np.ndarray]:
    """`value` as a numeric array (two elements or more, or a float), or None."""
    try:
        array = np.asarray(value)
    except (TypeError, ValueError, RuntimeError):
        return None  # ragged lists, tensors without a value (symbolic)
    return _numeric(array)


def value_fingerprints(values: Iterable[Tuple[str, np.ndarray]]) -> List[int]:
    """The fingerprints of `values` (for `ledger.recall`)."""
    return [value_fingerprint(array) for _, array in values]


def check_values(values: Iterable[Tuple[str, np.ndarray]], where: str) -> None:
    """Refuses a computation holding training rows or adapted, unvouched state.

    Args:
      values: From `graph_values`.
      where: What was traced, for the message (e.g. "the model `m`").

    Raises:
      ValueError: naming the value, what it copies and the ways out.
    """
    for name, array in values:
        source = _unvouched(_ADAPTED, value_fingerprint(array))
        if source is not None and array.size == 1 and _simple(array.ravel())[0]:
            source = None  # a scalar a person writes (0.5): no evidence of a copy
        if source is not None:
            raise ValueError(
                f"{where} holds `{name}`, the state layer `{source.layer}` computed by "
                "`adapt` (reached through a reference the layer checks do not follow, or "
                "copied into a constant or another layer). Computed on the private training "
                "set, it is a release of that data that epsilon does not cover. Declare the "
                "adapted layer public (tan_keras.mark_public(layer, reason=...)) if its data "
                "was public, or adapt it privately (tan_keras.private_adapt)."
            )
        statistic = statistic_copied(array)
        if statistic is not None:
            raise ValueError(
                f"{where} holds `{name}` (shape {tuple(array.shape)}), equal to the "
                f"{statistic} of the training data given to make_poisson_dataset (or fit): "
                "a statistic computed from the private training set is a release that "
                "epsilon does not cover, and through it one example moves every other "
                "example's input. Take preprocessing constants from public knowledge or "
                "public data, or release them with tan_keras.private_adapt."
            )
        if holds_training_rows(array):
            raise ValueError(
                f"{where} holds `{name}` (shape {tuple(array.shape)}), which contains rows of "
                "the training data given to make_poisson_dataset (or fit): a copy of private "
                "examples inside the computation (a pool to blend with, centres drawn from "
                "the data) reaches every example's clipped gradient without noise and is "
                "saved with the model. Take such values from public data; combine private "
                "examples only through the per-example gradients."
            )


def check_function(function, *specs, where: str) -> None:
    """Traces `function` on `specs` and applies `check_values` to what it holds."""
    # Traced outside any enclosing graph (a loss is checked while the train
    # step is traced), so that captured tensors keep their values.
    with tf.init_scope():
        graph = tf.function(function).get_concrete_function(*specs).graph
        values = graph_values(graph)
    check_values(values, where)


def _install() -> None:
    """Registers the state of every preprocessing layer `adapt` computes, when it returns.

    Only `adapt`: a vocabulary or statistics given to a constructor (or set
    by `private_adapt`) are no copy of adapted state.
    """
    from keras.src.layers.preprocessing import index_lookup

    kinds = (
        keras.layers.Normalization,
        keras.layers.Discretization,
        index_lookup.IndexLookup,
        keras.layers.IntegerLookup,
        keras.layers.StringLookup,
        keras.layers.TextVectorization,
    )
    for kind in kinds:
        original = kind.__dict__.get("adapt")
        if original is None or getattr(original, "_tan_keras_hook", False):
            continue

        def adapt(self, *args, _original=original, **kwargs):
            result = _original(self, *args, **kwargs)
            register_adapted(self)
            return result

        adapt._tan_keras_hook = True
        adapt.__doc__ = original.__doc__
        kind.adapt = adapt


_install()
