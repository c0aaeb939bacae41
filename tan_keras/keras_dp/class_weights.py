"""Class-weight tables are refused on a private model, on either backend.

`fit(class_weight=...)`, and its spelled-out form, a `sample_weight` that
is a function of the label (keras.io's imbalanced-classification recipe
writes `sample_weight = class_weight[y]` as often as `class_weight=`).

A table of weights per class is, in the usual recipe (keras.io's
imbalanced classification: 1 / count), computed from the training label
counts, and the model cannot tell such a table from one known in advance.
Computed so, one example's label moves every other example's weight, which
per-example clipping does not bound. Weights known without the training
labels belong in the loss.

Imports no TensorFlow: the JAX backend runs without it.
"""

from typing import Any

import numpy as np

from tan_keras import _validate

_INSTEAD = (
    "Use weights known without the training labels (public class priors, a fixed cost "
    "per class), written into a weighted loss (a loss function multiplying each "
    "example's loss by its class's constant). The checks of the traced loss look for "
    "copies of training rows and of feature statistics among its constants, not for "
    "label counts: where the weights come from stays yours to vouch for"
)


def refuse_class_weight(class_weight: Any) -> None:
    """Refuses `fit`'s `class_weight` on a private model (None passes).

    A class-weight table is a set of constants the model cannot tell from a
    statistic of the private labels: computed from the training label counts
    (keras.io's imbalanced-classification recipe, 1 / count), one example's
    label moves every other example's weight, so replacing one example moved
    a noiseless update by 3.7 times the replace-one bound (review).

    Args:
      class_weight: `fit`'s argument.

    Raises:
      ValueError: naming `class_weight`, for anything but None.
    """
    if class_weight is None:
        return
    raise _validate.invalid(
        "class_weight",
        "None for a private model",
        class_weight,
        "A class-weight table is a set of constants the model cannot tell from a "
        "statistic of the private labels: computed from the training label counts "
        "(1 / count), one example's label moves every other example's weight, and "
        "clipping no longer bounds what one example changes. " + _INSTEAD,
    )


def refuse_label_table(sample_weight: Any, labels: Any) -> None:
    """Refuses a `sample_weight` array that is a class-weight table looked up by label.

    Weights that are the same for every example of a class, with at least
    two positive values across classes, are `class_weight` spelled out (and
    computed, in the recipe, from the label counts). A 0/1 weight per class
    (a class left out) and weights that differ within a class pass: the
    guarantee takes each example's weight as part of its own record.

    Args:
      sample_weight: `fit`'s argument: None, or one weight per example.
      labels: `fit`'s `y`: integer class ids ([N] or [N, 1]) or one-hot
        rows ([N, C]); other labels (regression targets) are not compared.

    Raises:
      ValueError: naming `sample_weight`, for a per-class table.
    """
    classes = _class_ids(labels)
    if sample_weight is None or classes is None:
        return
    weights = np.asarray(sample_weight, np.float64).reshape(-1)
    if weights.size != classes.size:
        return
    per_class = {c: np.unique(weights[classes == c]) for c in np.unique(classes)}
    if any(len(values) > 1 for values in per_class.values()):
        return
    positive = {float(values[0]) for values in per_class.values() if values[0] > 0}
    if len(positive) < 2:
        return
    raise _validate.invalid(
        "sample_weight",
        "weights that are not a table looked up by the label (class_weight spelled out)",
        f"one weight per class: {sorted(positive)}",
        "A class-weight table is a set of constants the model cannot tell from a statistic "
        "of the private labels: computed from the training label counts (keras.io's "
        "1 / count), one example's label moves every other example's weight. " + _INSTEAD,
    )


def _class_ids(labels: Any):
    """[N] integer class ids of classification labels, or None for other labels."""
    if labels is None or not hasattr(labels, "__array__"):
        return None
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] > 1:
        one_hot = np.isin(labels, (0, 1)).all() and (labels.sum(axis=1) == 1).all()
        return np.argmax(labels, axis=1) if one_hot else None
    if labels.dtype.kind not in "iub" or labels.size != len(labels):
        return None
    return labels.reshape(-1)
