"""Plain Keras training of private weights: refused, or carried in the ledger.

After `make_private(model)`, `model.fit(...)` is an easy slip (the private
model shares its layers): the private weights would change with no clipping
or noise, and their ledger would not count it. Any plain Keras model whose
trainable weights are bound to a privacy ledger (the wrapped model, a new
model over a private model's layers) is refused, on either Keras backend.
A plain model holding copies of private values trains, and the values it
leaves keep their history (`ledger.carried_through_plain_training`).
"""

import functools

import keras

from tan_keras.keras_dp import ledger as ledger_lib

# The private model classes (one per backend) whose training is their own.
_PRIVATE_CLASSES: list = []


def _refuse(method_name: str) -> None:
    original = getattr(keras.Model, method_name)
    if getattr(original, "_tan_keras_refusal", False):
        return

    @functools.wraps(original)  # its signature too: DPKerasModel.fit binds to it
    def method(self, *args, **kwargs):
        private = isinstance(self, tuple(_PRIVATE_CLASSES))
        if not private and ledger_lib.has_ledger(self.trainable_variables):
            raise ValueError(
                f"Invalid call of `{method_name}` on model `{self.name}`: its trainable weights "
                "are those of a private model (bound to its privacy ledger). Plain Keras "
                "training would change them without clipping or noise, and epsilon would not "
                "count it. Train the private model that make_private returned (private.fit), "
                "or make this model private (tan_keras.make_private(model, ...)): it shares "
                "the ledger. To train a part of it on public data, freeze the private layers "
                "(layer.trainable = False) first."
            )
        if private:
            return original(self, *args, **kwargs)
        with ledger_lib.carried_through_plain_training(self):
            return original(self, *args, **kwargs)

    method._tan_keras_refusal = True
    setattr(keras.Model, method_name, method)


def guard(private_class: type) -> None:
    """Installs the refusal (module doc) on `keras.Model.fit` and `train_on_batch`.

    Args:
      private_class: The backend's `DPKerasModel`, whose training is private.
    """
    if private_class not in _PRIVATE_CLASSES:
        _PRIVATE_CLASSES.append(private_class)
    for name in ("fit", "train_on_batch"):
        _refuse(name)
