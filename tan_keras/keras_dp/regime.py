"""A warning when a private model is compiled with settings measured to train poorly.

Two regimes were measured on the first-day workflows (README,
`examples/measure.py`, epsilon 8, batches of 32), each against the same run
clipped without noise:

* An adaptive optimizer (Adam and its kin, RMSprop, Adagrad, Adadelta,
  Adafactor, Lion) on a model with trainable 2D or 3D convolutions: each
  coordinate of the update is divided by a running estimate of its scale,
  which under noise of std sigma * C / B per coordinate is mostly noise. The
  two image CNNs, trained from scratch, kept 0.63-0.64 of their noiseless
  accuracy with Adam; SGD with momentum 0.9 at learning rate 0.25 kept 0.77
  and 0.93 (0.87 for the first with augmult=4), and at learning rate 2.0
  with expected batches of 256 (the same rate per example) 0.97-1.10 and
  0.96. Fine-tuning a pretrained CNN at a small Adam rate kept 1.03 (near
  chance either way); it warns too, and SGD at a tenth of the head's rate
  ended at chance there, so the advice says to go much lower.
* Plain SGD on a model with a trainable Embedding: each row's gradient is
  sparse while the noise covers every row. The text model with SGD at 0.25
  ended at chance (0.498 against 0.962 clipped); with Adam it kept 0.91.

Both are legal and private, so this warns rather than refuses.
"""

import warnings

import keras

from tan_keras import _keras_internals


class TrainingRegimeWarning(UserWarning):
    """The private model's settings are in a regime measured to train poorly."""


# Keras's optimizers that normalize each coordinate by its own gradient scale.
_ADAPTIVE = tuple(
    getattr(keras.optimizers, name)
    for name in (
        "Adam",
        "AdamW",
        "Adamax",
        "Nadam",
        "RMSprop",
        "Adagrad",
        "Adadelta",
        "Adafactor",
        "Ftrl",
        "Lion",
        "Lamb",
        "ScheduleFreeAdamW",
    )
    if hasattr(keras.optimizers, name)
)

RECOMMENDED = "keras.optimizers.SGD(learning_rate=2.0, momentum=0.9)"
# The expected batch size RECOMMENDED was measured at (make_private's argument).
RECOMMENDED_BATCH = 256
_CONVOLUTIONS = tuple(
    getattr(keras.layers, name)
    for name in ("Conv2D", "Conv3D", "DepthwiseConv2D", "SeparableConv2D", "Conv2DTranspose")
)


def _trainable(model, kinds) -> bool:
    return any(
        isinstance(layer, kinds) and layer.trainable and layer.trainable_weights
        for layer in _keras_internals.all_layers(model)
    )


def adaptive_part(optimizer):
    """The adaptive optimizer `optimizer` is or holds (wrappers looked into), or None."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if isinstance(inner, _ADAPTIVE):
        return inner
    parts = getattr(inner, "optimizers", None)
    for part in parts if isinstance(parts, (list, tuple)) else ():
        found = adaptive_part(part)
        if found is not None:
            return found
    return None


def warn_if_known_poor(model, optimizer, noise_multiplier: float) -> None:
    """Warns, naming what to use, for a regime measured to train poorly (module docstring).

    Args:
      model: The private model being compiled.
      optimizer: The optimizer `compile` resolved.
      noise_multiplier: sigma; at 0 (a noiseless baseline) nothing is said.
    """
    if noise_multiplier <= 0:
        return
    found = adaptive_part(optimizer)
    if found is not None and _trainable(model, _CONVOLUTIONS):
        advice = (
            f"{type(found).__name__}, an adaptive optimizer, with trainable 2D "
            "convolutions: its per-coordinate scaling follows the noise, and the README's "
            "image CNNs trained from scratch kept only 0.64 of their noiseless accuracy "
            f"with Adam. Compile with optimizer={RECOMMENDED} and make the model private "
            f"with expected_batch_size={RECOMMENDED_BATCH} (fit's batch_size stays the "
            "micro-batch; kept 0.96-1.10 there; to fine-tune pretrained weights, a rate "
            "about 100x lower: a tenth lost all the pretrained accuracy)"
        )
    elif found is None and _trainable(model, keras.layers.Embedding):
        advice = (
            f"{type(getattr(optimizer, 'inner_optimizer', optimizer)).__name__} on a "
            "trainable Embedding: each row's gradient is sparse while the noise covers "
            "every row, and the README's text model trained to chance with SGD. Compile "
            "with keras.optimizers.Adam() (kept 0.91 there)"
        )
    else:
        return
    warnings.warn(
        f"The private model (noise_multiplier={noise_multiplier:g}) is compiled with "
        f"{advice}, or find settings for your model with the TAN search (README, "
        "'Settings that train').",
        TrainingRegimeWarning,
        stacklevel=3,
    )
