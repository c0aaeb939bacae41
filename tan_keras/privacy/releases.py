"""What a model's weights went through: its private releases and their epsilon.

The privacy ledger of a model (`tan_keras.keras_dp.ledger`) counts every
private release that shaped its weights, by mechanism:

* "poisson": DP-SGD updates on Poisson-sampled batches, each a
  `PoissonSampledDpEvent(q, GaussianDpEvent(sigma))` (add/remove adjacency).
  Updates on micro-batches the caller drew (`sampling="caller_poisson"`)
  are accounted alike, on the caller's word, but counted apart, as
  mechanisms with `unchecked=True`: the ledger keeps that part of its
  epsilon rests on sampling nothing checked, wherever the weights go
  (weight files, merges, remembered copies), and `unchecked_sampling`
  says so;
* "shuffled": epochs of DP-SGD on shuffled fixed-size batches, each at most
  one `GaussianDpEvent(sigma / 2)` (replace-one adjacency, no amplification;
  see `accounting.shuffled_dp_event`);
* "gaussian": one-shot Gaussian releases of sensitivity 1 computed on the
  whole training set (a privately adapted `Normalization`, see
  `tan_keras.keras_dp.private_adapt`), each a `GaussianDpEvent(sigma)`.

A model trained in two phases with other settings (a second `make_private`
over the same weights, fine-tuning with another batch size) holds one entry
per mechanism; its epsilon is that of their composition. This module holds
the entries, their composed epsilon, the step budget left by the other
entries, and the table format in which the ledger travels inside weight
files. No TensorFlow.
"""

import dataclasses
import math
from typing import Iterable, List, Optional, Sequence

import numpy as np
from dp_accounting import dp_event, pld, rdp

from tan_keras import _validate
from tan_keras.privacy import accounting

KINDS = ("poisson", "shuffled", "gaussian")
# The ledger's table in weight files: one row per mechanism.
# Columns: format, kind, dataset size, batch size, sigma, steps, epochs.
TABLE_FORMAT = 1
TABLE_COLUMNS = 7
_KIND_CODES = {kind: code for code, kind in enumerate(KINDS, start=1)}
# The kind column of an unchecked "poisson" mechanism. A code of its own,
# not a new column or format: every table written before it still loads,
# and a version that does not know it refuses the table (it would count
# these updates as checked) instead of reading it.
_UNCHECKED_POISSON_CODE = len(KINDS) + 1


@dataclasses.dataclass(frozen=True)
class Mechanism:
    """One kind of private release, the unit a ledger counts.

    Attributes:
      kind: "poisson", "shuffled" or "gaussian".
      noise_multiplier: The sigma that accounts one release (for DP-SGD the
        `accounted_noise_multiplier`, which includes a noisy clipped count).
      dataset_size: N for "poisson" and "shuffled"; 0 for "gaussian".
      batch_size: B (expected for "poisson"); 0 for "gaussian".
      unchecked: "poisson" only: the micro-batches were drawn by the caller
        (`sampling="caller_poisson"`) and nothing checked that they are
        Poisson samples, each used once. Accounted like checked ones, but a
        mechanism of its own (never merged with the checked one), so that
        the ledger can always say so (`unchecked_sampling`).
    """

    kind: str
    noise_multiplier: float
    dataset_size: int = 0
    batch_size: int = 0
    unchecked: bool = False

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "kind", _validate.one_of("kind", self.kind, KINDS))
        if not isinstance(self.unchecked, (bool, np.bool_)):
            raise _validate.invalid("unchecked", "True or False", self.unchecked)
        set_(self, "unchecked", bool(self.unchecked))
        if self.unchecked and self.kind != "poisson":
            raise _validate.invalid(
                "unchecked",
                "False unless kind='poisson' (only Poisson batches can be drawn by the caller)",
                self.unchecked,
            )
        set_(
            self,
            "noise_multiplier",
            _validate.non_negative("noise_multiplier", self.noise_multiplier),
        )
        if self.kind == "gaussian":
            if self.dataset_size or self.batch_size:
                raise _validate.invalid(
                    "dataset_size", "0 for a one-shot Gaussian release", self.dataset_size
                )
            return
        set_(self, "dataset_size", _validate.positive_int("dataset_size", self.dataset_size))
        set_(
            self,
            "batch_size",
            _validate.integer("batch_size", self.batch_size, low=1, high=self.dataset_size),
        )

    @property
    def sampling_rate(self) -> Optional[float]:
        """q = B / N of a "poisson" mechanism, else None."""
        if self.kind != "poisson":
            return None
        return self.batch_size / self.dataset_size

    def describe(self) -> str:
        """A short human-readable name, e.g. "Poisson q=0.0819 (B=4096, N=50000), sigma=3"."""
        sigma = f"sigma={self.noise_multiplier:.4g}"
        if self.kind == "poisson":
            unchecked = ", caller-drawn micro-batches, sampling unchecked" if self.unchecked else ""
            return (
                f"DP-SGD, Poisson q={self.sampling_rate:.4g} (B={self.batch_size}, "
                f"N={self.dataset_size}{unchecked}), {sigma}"
            )
        if self.kind == "shuffled":
            return f"DP-SGD, shuffled batches B={self.batch_size} of N={self.dataset_size}, {sigma}"
        return f"one-shot Gaussian release, {sigma}"


@dataclasses.dataclass(frozen=True)
class LedgerEntry:
    """How many releases of one mechanism a model's weights went through.

    Attributes:
      mechanism: The `Mechanism`.
      steps: Releases ("poisson": noisy updates; "shuffled": noisy updates,
        not what is accounted; "gaussian": one-shot releases).
      epochs: "shuffled" only: epochs in which an update was released (what
        is accounted); 0 otherwise.
    """

    mechanism: Mechanism
    steps: int
    epochs: int = 0

    def __post_init__(self):
        object.__setattr__(self, "steps", _validate.integer("steps", self.steps, low=0))
        object.__setattr__(self, "epochs", _validate.integer("epochs", self.epochs, low=0))

    @property
    def count(self) -> int:
        """The number of accounted mechanisms: epochs when shuffled, else steps."""
        return self.epochs if self.mechanism.kind == "shuffled" else self.steps


def unchecked_sampling(entries: Iterable[LedgerEntry]) -> bool:
    """Whether some of `entries`' releases are updates on sampling nothing checked.

    Args:
      entries: Ledger entries.

    Returns:
      True when an entry of an unchecked mechanism (`Mechanism.unchecked`)
      counts at least one update: its epsilon is that of Poisson sampling
      on the caller's word only.
    """
    return any(e.mechanism.unchecked and e.count > 0 for e in entries)


def check_adjacency(mechanisms: Iterable[Mechanism]) -> None:
    """Refuses a ledger that would mix Poisson and shuffled DP-SGD.

    Poisson DP-SGD is accounted under add/remove adjacency, shuffled batches
    under replace-one; this package does not compose the two.

    Raises:
      ValueError: naming `sampling`, when both kinds are present.
    """
    kinds = {m.kind for m in mechanisms}
    if {"poisson", "shuffled"} <= kinds:
        raise _validate.invalid(
            "sampling",
            "one sampling for every private training of the same weights (their epsilons "
            "are accounted under different adjacencies: Poisson under add/remove, shuffled "
            "batches under replace-one)",
            "both 'poisson' and 'shuffled'",
            "Train these weights with one sampling, or start from weights no private "
            "training has touched",
        )


def _events(entries: Sequence[LedgerEntry]) -> List[dp_event.DpEvent]:
    replace_one = any(e.mechanism.kind == "shuffled" for e in entries)
    events = []
    for entry in entries:
        mech, count = entry.mechanism, entry.count
        if count == 0:
            continue
        if mech.kind == "poisson":
            events.append(accounting.dp_event_for(mech.noise_multiplier, mech.sampling_rate, count))
        elif mech.kind == "shuffled":
            events.append(accounting.shuffled_dp_event(mech.noise_multiplier, count))
        else:
            # Sensitivity 1 under add/remove is 2 under replace-one.
            sigma = mech.noise_multiplier / 2.0 if replace_one else mech.noise_multiplier
            events.append(dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(sigma), count))
    return events


def composed_epsilon(
    entries: Sequence[LedgerEntry], delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon of all the releases in `entries`, composed, at `delta`.

    A ledger with one Poisson entry gives exactly `accounting.compute_epsilon`
    of it (the number every other part of the package reports).

    Args:
      entries: The ledger's entries.
      delta: Target delta in (0, 1).
      accountant: "rdp" (default) or "pld". With "pld", a composition of
        several mechanisms whose RDP epsilon exceeds
        `accounting.PLD_MAX_EPSILON` is reported with the RDP bound.

    Returns:
      Epsilon >= 0; math.inf if a release with sigma = 0 happened.

    Raises:
      ValueError: on a bad argument, or Poisson and shuffled entries together.
    """
    delta = _validate.delta("delta", delta)
    accountant = _validate.one_of("accountant", accountant, accounting.ACCOUNTANTS)
    live = [e for e in entries if e.count > 0]
    check_adjacency(e.mechanism for e in live)
    if not live:
        return 0.0
    if any(e.mechanism.noise_multiplier == 0.0 for e in live):
        return math.inf
    if len(live) == 1 and live[0].mechanism.kind == "poisson":
        mech = live[0].mechanism
        return accounting.compute_epsilon(
            mech.noise_multiplier, mech.sampling_rate, live[0].count, delta, accountant
        )
    if len(live) == 1 and live[0].mechanism.kind == "shuffled":
        return accounting.compute_shuffled_epsilon(
            live[0].mechanism.noise_multiplier, live[0].count, delta, accountant
        )
    event = dp_event.ComposedDpEvent(_events(live))
    eps_rdp = float(rdp.RdpAccountant().compose(event).get_epsilon(delta))
    if accountant == "rdp" or eps_rdp > accounting.PLD_MAX_EPSILON:
        return eps_rdp
    return float(pld.PLDAccountant().compose(event).get_epsilon(delta))


def steps_within_budget(
    others: Sequence[LedgerEntry],
    mechanism: Mechanism,
    spent: int,
    target_epsilon: float,
    delta: float,
    accountant: str = "rdp",
) -> int:
    """The largest step count of `mechanism` whose composition with `others` fits a budget.

    Args:
      others: The ledger's other entries (fixed).
      mechanism: The "poisson" mechanism that keeps training.
      spent: Its steps so far (the answer is never below it: the ledger
        does not move back).
      target_epsilon: The budget, > 0.
      delta: Target delta.
      accountant: "rdp" or "pld".

    Returns:
      The largest S >= `spent` with epsilon(others + S steps) <= target, or
      `spent` when even that is over the budget (no further step fits).

    Raises:
      ValueError: on a bad argument.
    """
    target = _validate.positive("target_epsilon", target_epsilon)
    spent = _validate.integer("spent", spent, low=0)
    if mechanism.kind != "poisson":
        raise _validate.invalid("mechanism", "a 'poisson' mechanism", mechanism.kind)
    if not any(e.count for e in others):
        if (
            accounting.compute_epsilon(
                mechanism.noise_multiplier,
                mechanism.sampling_rate,
                max(spent, 1),
                delta,
                accountant,
            )
            > target
        ):
            return spent
        return max(
            spent,
            accounting.calibrate_steps(
                target, mechanism.noise_multiplier, mechanism.sampling_rate, delta, accountant
            ),
        )

    def within(steps: int) -> bool:
        entries = list(others) + [LedgerEntry(mechanism, steps)]
        return composed_epsilon(entries, delta, accountant) <= target

    if not within(spent + 1):
        return spent
    return accounting._largest_within(within, spent + 1, accounting._MAX_STEPS)


def to_table(entries: Sequence[LedgerEntry]) -> np.ndarray:
    """The entries as the float64 table that weight files carry ([rows, TABLE_COLUMNS]).

    Every field is an integer below 2**53 or a float64, so the table is exact.
    """
    rows = [
        [
            TABLE_FORMAT,
            _UNCHECKED_POISSON_CODE if e.mechanism.unchecked else _KIND_CODES[e.mechanism.kind],
            e.mechanism.dataset_size,
            e.mechanism.batch_size,
            e.mechanism.noise_multiplier,
            e.steps,
            e.epochs,
        ]
        for e in entries
    ]
    return np.asarray(rows, np.float64).reshape(len(rows), TABLE_COLUMNS)


def from_table(table) -> List[LedgerEntry]:
    """The entries a table written by `to_table` holds.

    Raises:
      ValueError: naming `table`, if it is not such a table (unknown format
        or kind, negative counts, non-integral sizes).
    """
    array = np.asarray(table, np.float64)
    if array.size == 0:
        return []
    if array.ndim != 2 or array.shape[1] != TABLE_COLUMNS:
        raise _validate.invalid(
            "table", f"a privacy ledger table of shape [rows, {TABLE_COLUMNS}]", array.shape
        )
    entries = []
    kinds = {code: kind for kind, code in _KIND_CODES.items()}
    kinds[_UNCHECKED_POISSON_CODE] = "poisson"
    for row in array:
        fmt, code, n, b, sigma, steps, epochs = row.tolist()
        if fmt != TABLE_FORMAT or code not in kinds:
            raise _validate.invalid(
                "table",
                f"a privacy ledger of format {TABLE_FORMAT} written by tan_keras",
                f"a row of format {fmt:g} and kind {code:g}",
                "It was written by another version of tan_keras: refusing to guess how "
                "many updates these weights went through",
            )
        integral = [n, b, steps, epochs]
        if any(not math.isfinite(v) or v != int(v) or v < 0 for v in integral):
            raise _validate.invalid("table", "integral sizes and counts >= 0", row.tolist())
        unchecked = code == _UNCHECKED_POISSON_CODE
        mechanism = Mechanism(kinds[code], sigma, int(n), int(b), unchecked=unchecked)
        entries.append(LedgerEntry(mechanism, int(steps), int(epochs)))
    return entries
