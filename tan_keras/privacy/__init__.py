"""Privacy accounting with the Total Amount of Noise (TAN).

Modules:
  accounting: epsilon of Poisson-sampled DP-SGD (dp_accounting's RDP or PLD
    accountant) and calibration of sigma, steps or batch size to a budget.
  tan: eta and eps_TAN of Sander et al. (ICML 2023), formulas only.
  overcharge: the overcharged regime (exact epsilon far above eps_TAN).
  planning: cheap, non-private simulations of a private run, step search.
  cli: the work behind `python -m tan_keras.privacy`.

None of them imports TensorFlow.
"""

from tan_keras.privacy.accounting import (
    calibrate_batch_size,
    calibrate_noise_multiplier,
    calibrate_steps,
    compute_epsilon,
    dp_event_for,
    epochs_to_steps,
    sampling_rate,
    steps_to_epochs,
)
from tan_keras.privacy.overcharge import check_overcharge
from tan_keras.privacy.planning import plan_simulation, step_search
from tan_keras.privacy.tan import eps_tan, eta, eta_for_epsilon

__all__ = [
    "calibrate_batch_size",
    "calibrate_noise_multiplier",
    "calibrate_steps",
    "check_overcharge",
    "compute_epsilon",
    "dp_event_for",
    "epochs_to_steps",
    "eps_tan",
    "eta",
    "eta_for_epsilon",
    "plan_simulation",
    "sampling_rate",
    "step_search",
    "steps_to_epochs",
]
