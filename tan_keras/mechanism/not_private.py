"""The warning a setting that voids the guarantee against some observer gives.

Kept apart from the noise generators (`noise.py`, TensorFlow) so that the
mechanisms the JAX backend uses (`moments.py`) warn with the same class.
"""

SEEDED_NOISE_WARNING = (
    "The DP noise was given an explicit seed ({seed}). The run is NOT private "
    "against anyone who knows this seed: they can regenerate the noise and "
    "subtract it. Use an explicit seed for debugging only."
)


class NotPrivateWarning(UserWarning):
    """Warned when a setting voids the privacy guarantee against some observer."""
