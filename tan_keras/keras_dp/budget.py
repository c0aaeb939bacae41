"""`make_private_with_epsilon`: a private model from a privacy budget in one call.

One design for both Keras backends: each backend's `make_private_with_epsilon`
is `calibrated` with its own `make_private`. The user says what they may
spend (epsilon, delta) and how long they want to train (epochs at an
expected batch size B on N examples); the noise multiplier that spends at
most that budget over ceil(epochs * N / B) noisy updates is calibrated by
the accountant, the plan is shown (sigma, steps, eta, eps_TAN, the
overcharged regime), and every `fit` of the model carries a
`PrivacyAccountant` that stops training BEFORE an update would take the
ledger's epsilon past the budget -- the whole ledger's, so earlier releases
of the same weights count too.
"""

import dataclasses
import math
from typing import Callable, List, Optional, Sequence, Tuple

import keras

from tan_keras import _validate
from tan_keras.keras_dp import ledger
from tan_keras.privacy import cli, releases


@dataclasses.dataclass(frozen=True)
class PrivacyBudget:
    """What a model made by `make_private_with_epsilon` may spend.

    Attributes:
      target_epsilon: The budget's epsilon, > 0.
      delta: Its delta, in (0, 1).
      accountant: "rdp" or "pld".
      plan: The calibrated plan (`tan_keras.privacy.cli.report`'s dict).
    """

    target_epsilon: float
    delta: float
    accountant: str
    plan: dict
    earlier_releases: Tuple[releases.LedgerEntry, ...] = ()

    def describe(self) -> str:
        """The plan as printed when the model is made."""
        text = cli.format_report(self.plan)
        if self.earlier_releases:
            spent = releases.composed_epsilon(self.earlier_releases, self.delta, self.accountant)
            total = releases.composed_epsilon(
                list(self.earlier_releases) + [_training_entry(self.plan)],
                self.delta,
                self.accountant,
            )
            text += (
                f"\nThe weights already went through {len(self.earlier_releases)} private "
                f"release(s) (epsilon {spent:.3g} alone, e.g. a private_adapt): the noise "
                f"multiplier is calibrated so that they and the training compose to "
                f"epsilon {total:.3g} <= {self.target_epsilon:g}."
            )
            if releases.unchecked_sampling(self.earlier_releases):
                text += (
                    "\nunchecked_sampling: 1 -- some of those updates were on micro-batches "
                    "the caller drew (sampling='caller_poisson'): their epsilon holds only if "
                    "those were Poisson samples, each used once; nothing checked it."
                )
        return text


def _training_entry(plan: dict) -> releases.LedgerEntry:
    sigma = plan["accounted_noise_multiplier"] or plan["noise_multiplier"]
    mechanism = releases.Mechanism("poisson", sigma, plan["dataset_size"], plan["batch_size"])
    return releases.LedgerEntry(mechanism, plan["steps"])


def _earlier_releases(model: keras.Model) -> List[releases.LedgerEntry]:
    """What the model's weights already went through (a private adapt, an earlier phase)."""
    found = ledger.ledger_of(list(model.weights)) if model.built else None
    return [e for e in found.entries() if e.steps or e.epochs] if found else []


def _plan_after(earlier, plan: dict, target_epsilon: float, settings: dict) -> dict:
    """The plan whose training composes with `earlier` to at most `target_epsilon`.

    A bisection on log(sigma) between the plan's sigma (the budget spent by
    training alone: too little noise once the earlier releases count) and
    a sigma whose composition fits; only a fitting sigma is returned.

    Raises:
      ValueError: when the earlier releases alone spend the budget.
    """

    def fits(candidate: dict) -> bool:
        entries = list(earlier) + [_training_entry(candidate)]
        return releases.composed_epsilon(entries, settings["delta"], settings["accountant"]) <= (
            target_epsilon
        )

    spent = releases.composed_epsilon(earlier, settings["delta"], settings["accountant"])
    if spent >= target_epsilon:
        raise _validate.invalid(
            "target_epsilon",
            f"a float above the epsilon the weights already spent ({spent:.4g})",
            target_epsilon,
            "Their privacy ledger holds earlier releases (a private_adapt, an earlier "
            "training phase); raise the budget or start from other weights",
        )
    low, high = plan["noise_multiplier"], plan["noise_multiplier"]
    candidate = plan
    while not fits(candidate):
        low, high = high, high * 2
        candidate = cli.report(noise_multiplier=high, **settings)
    best = candidate
    for _ in range(30):
        if high / low < 1.001:
            break
        middle = math.sqrt(low * high)
        candidate = cli.report(noise_multiplier=middle, **settings)
        if fits(candidate):
            high, best = middle, candidate
        else:
            low = middle
    return best


def calibrated(
    make_private: Callable,
    model: keras.Model,
    *,
    target_epsilon: float,
    delta: float,
    epochs: float,
    expected_batch_size: int,
    dataset_size: int,
    l2_norm_clip: float = 1.0,
    accountant: str = "rdp",
    input_shape: Optional[Sequence[int]] = None,
    verbose: bool = True,
    **dp_kwargs,
):
    """Makes `model` private with the noise that trains `epochs` within a budget.

    Releases the model's weights already went through (a `private_adapt` of
    one of its layers, an earlier private training phase) count: sigma is
    calibrated so that they and the planned training compose to at most
    `target_epsilon`, and the printed plan says so.

    Args:
      make_private: The backend's `make_private`.
      model: A Keras 3 model, as for `make_private`.
      target_epsilon: The privacy budget's epsilon, a float > 0.
      delta: Its delta, a float in (0, 1); no default: take it well below
        1 / dataset_size (e.g. 1e-5 for 50,000 examples).
      epochs: Planned passes over the data, a float > 0: the noise is
        calibrated for ceil(epochs * N / B) noisy updates.
      expected_batch_size: B, the expected Poisson batch size.
      dataset_size: N, the number of distinct training examples.
      l2_norm_clip: C, the per-example clipping norm (default 1.0).
      accountant: "rdp" (default) or "pld".
      input_shape: For a subclassed model, as for `make_private`.
      verbose: Print the plan (default True).
      **dp_kwargs: Other `DPKerasModel` arguments (augmult, ema_decay,
        clipping, sampling, clipped_fraction_std, ...); not noise_multiplier.

    Returns:
      A `DPKerasModel` (compile it, then fit): its `privacy_budget` holds the
      budget and plan, and each `fit` without a `PrivacyAccountant` of its
      own gets one that logs epsilon and stops at the budget.

    Raises:
      ValueError: before anything is built, on an argument out of range, a
        `noise_multiplier` among `dp_kwargs`, a budget the accountant
        cannot meet, or one the weights' earlier releases already spent.
    """
    if "noise_multiplier" in dp_kwargs:
        raise _validate.invalid(
            "noise_multiplier",
            "no value: make_private_with_epsilon calibrates it for target_epsilon",
            dp_kwargs["noise_multiplier"],
            "Use make_private to choose the noise multiplier yourself",
        )
    target_epsilon = _validate.positive("target_epsilon", target_epsilon)
    delta = _validate.delta("delta", delta)
    epochs = _validate.positive("epochs", epochs)
    accountant = _validate.one_of("accountant", accountant, ("rdp", "pld"))
    settings = dict(
        dataset_size=dataset_size,
        batch_size=expected_batch_size,
        delta=delta,
        epochs=epochs,
        augmult=dp_kwargs.get("augmult", 1),
        accountant=accountant,
        clipped_fraction_std=dp_kwargs.get("clipped_fraction_std"),
    )
    plan = cli.report(target_eps=target_epsilon, **settings)
    earlier = _earlier_releases(model)
    if earlier:
        plan = _plan_after(earlier, plan, target_epsilon, settings)
    private = make_private(
        model,
        input_shape=input_shape,
        l2_norm_clip=l2_norm_clip,
        noise_multiplier=plan["noise_multiplier"],
        expected_batch_size=expected_batch_size,
        dataset_size=dataset_size,
        **dp_kwargs,
    )
    private.privacy_budget = PrivacyBudget(
        target_epsilon=float(target_epsilon),
        delta=float(delta),
        accountant=accountant,
        plan=plan,
        earlier_releases=tuple(earlier),
    )
    if verbose:
        print(private.privacy_budget.describe())
    return private


# The key of a private model's config that holds its budget.
CONFIG_KEY = "privacy_budget"


def to_config(budget: Optional[PrivacyBudget]) -> dict:
    """{CONFIG_KEY: the budget} for a model's config (empty without a budget).

    A model saved and loaded keeps its budget: without it a reloaded model
    trained on past the budget with no stop and no epsilon logged (review).
    The releases before the training are in the ledger, which travels with
    the weights.
    """
    if budget is None:
        return {}
    return {
        CONFIG_KEY: {
            "target_epsilon": budget.target_epsilon,
            "delta": budget.delta,
            "accountant": budget.accountant,
            "plan": budget.plan,
        }
    }


def restore(model, saved: Optional[dict]) -> None:
    """Gives a model loaded from its config the budget saved with it (`to_config`)."""
    if saved is not None:
        model.privacy_budget = PrivacyBudget(
            target_epsilon=float(saved["target_epsilon"]),
            delta=float(saved["delta"]),
            accountant=str(saved["accountant"]),
            plan=dict(saved["plan"]),
        )


# The docstring of each backend's `make_private_with_epsilon` (`calibrated`
# with that backend's `make_private`).
MAKE_PRIVATE_WITH_EPSILON_DOC = calibrated.__doc__.replace(
    "      make_private: The backend's `make_private`.\n", ""
)
