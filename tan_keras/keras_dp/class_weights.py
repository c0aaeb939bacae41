"""`fit(class_weight=...)` is refused on a private model, on either backend.

A table of weights per class is, in the usual recipe (keras.io's
imbalanced classification: 1 / count), computed from the training label
counts, and the model cannot tell such a table from one known in advance.
Computed so, one example's label moves every other example's weight, which
per-example clipping does not bound. Weights known without the training
labels belong in the loss.

Imports no TensorFlow: the JAX backend runs without it.
"""

from typing import Any

from tan_keras import _validate


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
        "clipping no longer bounds what one example changes. Use weights known without "
        "the training labels (public class priors, a fixed cost per class), written into "
        "a weighted loss (a loss function multiplying each example's loss by its class's "
        "constant). The checks of the traced loss look for copies of training rows and "
        "of feature statistics among its constants, not for label counts: where the "
        "weights come from stays yours to vouch for",
    )
