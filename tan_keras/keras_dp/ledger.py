"""The privacy ledger, bound to the variables it protects.

A ledger counts the private releases that shaped a set of weights (see
`tan_keras.privacy.releases`). It belongs to the weights, not to the
`DPKerasModel` that trains them:

* **In this process**, every variable of a private model points to its
  ledger. A second `make_private` (or `DPKerasModel`) over the same
  variables, a model that reuses a privately trained model's layers, and
  `private_adapt` of one of its layers all find and share that ledger, so a
  second training phase counts on top of the first. Models with the same DP
  mechanism (sampling, N, B, sigma) share its counters; another mechanism
  adds an entry, and epsilon is that of the composition. One `position`
  counts the noisy updates of every mechanism: it is the logical step a
  Poisson pipeline must deliver next, so that a second phase with other
  settings never draws the first phase's steps of the same sampler again.
* **Across processes**, the ledger travels with every file that holds the
  weights: `save_weights`/`load_weights`, `.keras` files, `ModelCheckpoint`,
  `BackupAndRestore` (Keras weight files: a `privacy_ledger` entry written
  beside the layers) and `tf.train.Checkpoint` (a `dp_ledger` dependency).
* **Weights copied as arrays in this process** (`clone_model` then
  `set_weights(private.get_weights())`, a layer's `set_weights`, the EMA
  weights read inside `ema_weights()`) are recognised by their values: at
  the end of every epoch and of every fit, private training remembers a
  fingerprint of each weight it changed, EMA shadows included
  (`remember`); a private model built over, or trained from, a weight with
  such a fingerprint takes the ledger it went through (`recall`). A copy
  whose values changed (a cast to float16, pruning) is not recognised.
* **It only moves forward.** Loading any of those files merges the file's
  counts into the ledger by maximum: restoring older weights (EarlyStopping,
  an older checkpoint) keeps the count of the updates already released,
  and weights restored in a fresh process bring at least the count of the
  updates they went through.

What the ledger cannot follow: arrays that leave the process (pickled
`get_weights`) and a file loaded into a plain Keras model that no private
model wraps yet (Keras skips the entry). Load weights into the private
model (or into the wrapped model after `make_private`).
"""

import collections
import hashlib
import weakref
from typing import Dict, Iterable, List, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from tan_keras import _validate
from tan_keras.privacy import releases

# The attribute that binds a variable, or a model, to its ledger.
_ATTRIBUTE = "_tan_keras_ledger"
# The name of the ledger's entry in Keras weight files and TF checkpoints.
SAVED_NAME = "privacy_ledger"
_CHECKPOINT_NAME = "dp_ledger"


def replicated_counter(value: int, name: str) -> tf.Variable:
    """An int64 counter that every replica updates alike (first replica's value kept)."""
    return tf.Variable(
        value,
        dtype=tf.int64,
        trainable=False,
        name=name,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
    )


class _Counters:
    """The counts of one mechanism: `steps`, `epochs` (int64 variables)."""

    def __init__(self, steps: int = 0, epochs: int = 0):
        with tf.init_scope():
            self.steps = replicated_counter(steps, "dp_steps")
            self.epochs = replicated_counter(epochs, "dp_epochs")
        self.strategy = tf.distribute.get_strategy()
        # The private models whose compiled steps advance these variables.
        self.owners = weakref.WeakSet()

    def values(self):
        return int(self.steps.numpy()), int(self.epochs.numpy())

    def raise_to(self, steps: int, epochs: int) -> None:
        current_steps, current_epochs = self.values()
        self.steps.assign(max(current_steps, steps))
        self.epochs.assign(max(current_epochs, epochs))


class PrivacyLedger:
    """The private releases a set of weights went through, by mechanism.

    Get it from a model: `model.privacy_ledger`. Every count only grows.
    """

    def __init__(self):
        self._counters: Dict[releases.Mechanism, _Counters] = {}
        self._absorbed_into: Optional[PrivacyLedger] = None
        self._position: Optional[_Counters] = None

    # ----------------------------------------------------------------- reading
    def root(self) -> "PrivacyLedger":
        """The ledger this one was merged into, if any (else itself)."""
        ledger = self
        while ledger._absorbed_into is not None:
            ledger = ledger._absorbed_into
        return ledger

    def entries(self) -> List[releases.LedgerEntry]:
        """Every mechanism with its counts so far."""
        root = self.root()
        return [
            releases.LedgerEntry(mechanism, *counters.values())
            for mechanism, counters in root._counters.items()
        ]

    def epsilon(
        self,
        delta: float,
        accountant: str = "rdp",
        steps: Optional[Dict[releases.Mechanism, int]] = None,
    ) -> float:
        """Epsilon of every release composed (`releases.composed_epsilon`).

        Args:
          delta: Target delta.
          accountant: "rdp" or "pld".
          steps: Optional step counts to use instead of the recorded ones,
            by mechanism (to ask "what after S steps?").

        Returns:
          Epsilon >= 0 (math.inf after a release with sigma = 0).
        """
        entries = self.entries()
        for mechanism, count in (steps or {}).items():
            entries = [e for e in entries if e.mechanism != mechanism]
            entries.append(releases.LedgerEntry(mechanism, count))
        return releases.composed_epsilon(entries, delta, accountant)

    def total_steps(self) -> int:
        """Noisy DP-SGD updates of every mechanism together."""
        return sum(e.steps for e in self.entries() if e.mechanism.kind != "gaussian")

    def position(self, owner=None) -> tf.Variable:
        """The logical step a Poisson pipeline must deliver next (int64 variable).

        It counts the noisy updates of every mechanism of the ledger (at
        least `total_steps()`), and moves forward with each of them: the
        train step checks each micro-batch's identity against it, and `fit`
        resumes a pipeline's sampler there.

        Args:
          owner: The private model whose compiled step advances it.

        Raises:
          ValueError: if it lives under another distribution strategy than
            the current one while another model uses it.
        """
        root = self.root()
        current = root._position
        if current is not None and current.strategy is not tf.distribute.get_strategy():
            if len(current.owners):
                raise ValueError(
                    "Invalid distribution strategy: these weights are trained privately by "
                    "another model under another tf.distribute strategy, and both would "
                    "advance one privacy ledger. Build every private model over these "
                    "weights under the same strategy scope."
                )
            current = None
        if current is None:
            steps = root.total_steps()
            if root._position is not None:
                steps = max(steps, root._position.values()[0])
            current = root._position = _Counters(steps)
        if owner is not None:
            current.owners.add(owner)
        return current.steps

    def _sync_position(self) -> None:
        root = self.root()
        if root._position is not None:
            root._position.raise_to(root.total_steps(), 0)

    def table(self) -> np.ndarray:
        """The ledger in the format weight files carry (`releases.to_table`)."""
        return releases.to_table(self.entries())

    def describe(self) -> List[str]:
        """One line per mechanism: its name and counts."""
        lines = []
        for entry in self.entries():
            counts = f"{entry.steps} releases"
            if entry.mechanism.kind == "poisson":
                counts = f"{entry.steps} noisy updates"
            elif entry.mechanism.kind == "shuffled":
                counts = f"{entry.steps} noisy updates in {entry.epochs} epochs"
            lines.append(f"{entry.mechanism.describe()}: {counts}")
        return lines

    # ----------------------------------------------------------------- writing
    def counters(self, mechanism: releases.Mechanism, owner=None) -> _Counters:
        """The counters of `mechanism` (created at 0 if new), for `owner`'s step.

        Args:
          mechanism: The mechanism.
          owner: The private model whose compiled step will advance them.

        Raises:
          ValueError: if the ledger would mix Poisson and shuffled
            sampling, or the counters live under another distribution
            strategy than the current one while another model uses them.
        """
        root = self.root()
        releases.check_adjacency([mechanism, *root._counters])
        counters = root._counters.get(mechanism)
        strategy = tf.distribute.get_strategy()
        if counters is not None and counters.strategy is not strategy:
            if len(counters.owners):
                raise ValueError(
                    "Invalid distribution strategy: these weights are trained privately by "
                    "another model under another tf.distribute strategy, and both would "
                    "advance one privacy ledger. Build every private model over these "
                    "weights under the same strategy scope."
                )
            counters = None
        if counters is None:
            previous = root._counters.get(mechanism)
            counters = _Counters(*(previous.values() if previous is not None else (0, 0)))
            root._counters[mechanism] = counters
        if owner is not None:
            counters.owners.add(owner)
        return counters

    def record_release(self, mechanism: releases.Mechanism) -> None:
        """Counts one one-shot release (a "gaussian" mechanism)."""
        if mechanism.kind != "gaussian":
            raise _validate.invalid("mechanism", "a 'gaussian' mechanism", mechanism.kind)
        counters = self.counters(mechanism)
        counters.steps.assign_add(1)

    def merge(self, entries: Iterable[releases.LedgerEntry]) -> None:
        """Raises each mechanism's counts to at least those of `entries` (never lowers)."""
        entries = list(entries)
        root = self.root()
        releases.check_adjacency([e.mechanism for e in entries] + list(root._counters))
        for entry in entries:
            counters = root._counters.get(entry.mechanism)
            if counters is None:
                counters = root.counters(entry.mechanism)
            counters.raise_to(entry.steps, entry.epochs)
        root._sync_position()

    def merge_table(self, table) -> None:
        """`merge` of a table read from a weight file (`releases.from_table`)."""
        self.merge(releases.from_table(table))

    def _live(self) -> bool:
        root = self.root()
        counters = list(root._counters.values())
        if root._position is not None:
            counters.append(root._position)
        return any(len(c.owners) for c in counters)

    def _absorb(self, other: "PrivacyLedger") -> None:
        """Adds `other`'s counts to this ledger's and makes it point here."""
        root, other = self.root(), other.root()
        if other is root:
            return
        releases.check_adjacency(list(root._counters) + list(other._counters))
        for entry in other.entries():
            counters = root.counters(entry.mechanism)
            steps, epochs = counters.values()
            counters.steps.assign(steps + entry.steps)
            counters.epochs.assign(epochs + entry.epochs)
        other._absorbed_into = root
        root._sync_position()


def ledger_of(objects: Sequence) -> Optional[PrivacyLedger]:
    """The one ledger bound to `objects` (variables or models), or None.

    Ledgers that no live private model advances (a privately adapted layer's,
    one restored from a file into a model trained no more) are merged into
    the one that is. Two ledgers that private models still advance are not.

    Raises:
      ValueError: if the objects belong to two ledgers that private models
        still advance.
    """
    found = []
    for obj in objects:
        ledger = getattr(obj, _ATTRIBUTE, None)
        if isinstance(ledger, _LedgerSaveable):
            ledger = ledger.ledger
        if isinstance(ledger, PrivacyLedger):
            root = ledger.root()
            if all(root is not other for other in found):
                found.append(root)
    if not found:
        return None
    live = [ledger for ledger in found if ledger._live()]
    if len(live) > 1:
        raise ValueError(
            "Invalid model: its weights come from two models that are trained privately "
            "with separate privacy ledgers, and one model over both would need to compose "
            "histories that are still growing. Finish training those models, or train "
            "their parts under one private model."
        )
    keep = live[0] if live else found[0]
    for ledger in found:
        keep._absorb(ledger)
    return keep.root()


def bind(ledger: PrivacyLedger, variables: Iterable) -> None:
    """Points each variable to `ledger` (a variable already bound keeps its ledger's root)."""
    for variable in variables:
        object.__setattr__(variable, _ATTRIBUTE, ledger)


def attach(obj, ledger: PrivacyLedger) -> None:
    """Makes `obj` (a Keras model) write and read `ledger` with its weights.

    Keras weight files (`save_weights`, `.keras`, the callbacks that use
    them) find it as the `privacy_ledger` attribute; `tf.train.Checkpoint`
    as the `dp_ledger` dependency. It is not a weight: `get_weights` and
    `set_weights` do not see it.
    """
    object.__setattr__(obj, _ATTRIBUTE, _LedgerSaveable(ledger))
    obj._track_trackable(_LedgerTensors(ledger), name=_CHECKPOINT_NAME, overwrite=True)


class _LedgerSaveable(keras.layers.Layer):
    """The ledger as Keras saving sees it: a layer with one table, merged on load."""

    def __init__(self, ledger: PrivacyLedger):
        super().__init__(name=SAVED_NAME, trainable=False)
        object.__setattr__(self, "ledger", ledger)

    def save_own_variables(self, store):
        store["0"] = self.ledger.root().table()

    def load_own_variables(self, store):
        # A file written before the ledger existed, or by a plain model,
        # has no table: nothing to merge (the ledger never moves back).
        if "0" in list(store.keys()):
            self.ledger.root().merge_table(np.asarray(store["0"]))


class _LedgerTensors(tf.__internal__.tracking.Trackable):
    """The ledger as `tf.train.Checkpoint` sees it: one tensor, merged on restore."""

    def __init__(self, ledger: PrivacyLedger):
        self._ledger = ledger

    def _serialize_to_tensors(self):
        return {"table": tf.constant(self._ledger.root().table(), tf.float64)}

    def _restore_from_tensors(self, restored_tensors):
        self._ledger.root().merge_table(restored_tensors["table"].numpy())
        return tf.no_op()


# Fingerprints of weight values private training left -> the ledger table then.
_REMEMBERED: "collections.OrderedDict[bytes, np.ndarray]" = collections.OrderedDict()
# Bounded: a variable of a few weights per layer, a few hundred layers, a few
# recent epochs and models.
_REMEMBER_AT_MOST = 8192


def _fingerprint(variable) -> bytes:
    """A hash of one variable's value (with its shape and dtype)."""
    value = np.asarray(variable.numpy())
    digest = hashlib.blake2b(f"{value.dtype}{value.shape}".encode(), digest_size=24)
    digest.update(value.tobytes())
    return digest.digest()


def _layer_weights(model) -> List:
    """The weights of `model`'s layers, each once (not the model's own, e.g. EMA)."""
    seen, weights = set(), []
    for layer in model.layers:
        for variable in layer.weights:
            if id(variable) not in seen:
                seen.add(id(variable))
                weights.append(variable)
    return weights


def fingerprints(variables: Iterable) -> Dict[int, bytes]:
    """{id(variable): fingerprint} of `variables`' current values."""
    return {id(v): _fingerprint(v) for v in variables}


def remember(variables: Iterable, ledger: PrivacyLedger, unless: Dict[int, bytes]) -> None:
    """Records that the current values of `variables` went through `ledger`'s releases.

    One fingerprint per variable, so that a copy of some layers (a backbone
    under a new head, the EMA shadows swapped in) is recognised too.

    Args:
      variables: The trained model's weights, its EMA shadows included.
      ledger: Its ledger.
      unless: The fingerprints at the start of the fit: a variable that did
        not change (frozen, or a zero update) is not recorded, since other
        models hold the same initial values.
    """
    table = ledger.root().table()
    for variable in variables:
        fingerprint = _fingerprint(variable)
        if unless.get(id(variable)) == fingerprint:
            continue
        _REMEMBERED[fingerprint] = table
        _REMEMBERED.move_to_end(fingerprint)
    while len(_REMEMBERED) > _REMEMBER_AT_MOST:
        _REMEMBERED.popitem(last=False)


def recall(model, ledger: PrivacyLedger) -> Dict[int, bytes]:
    """Merges into `ledger` what any of `model`'s weights went through, if known.

    Args:
      model: A private model (its layers' weights are looked up).
      ledger: Its ledger.

    Returns:
      The fingerprints of the model's layers' weights (for `remember`'s `unless`).
    """
    found = fingerprints(_layer_weights(model))
    for fingerprint in set(found.values()):
        table = _REMEMBERED.get(fingerprint)
        if table is not None:
            ledger.root().merge_table(table)
    return found
