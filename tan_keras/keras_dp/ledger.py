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
  `BackupAndRestore` (Keras weight files: a ledger entry written beside the
  model and beside each layer that holds weights) and `tf.train.Checkpoint`
  (a `dp_ledger` dependency of the model and of each such layer). Written
  per layer, it goes into the file of any model built from those layers (a
  feature extractor cut from a private model and saved as plain Keras); a
  plain layer loaded from such a file takes it back (`_restore_from_file`),
  and a restored `tf.train.Checkpoint` hands it over when a private model
  is built over the layers. The hooks into Keras's weight files are
  installed at `import tan_keras` (`tan_keras._keras_saving`). A plain layer
  whose values are remembered (below) writes their segments into the file
  too (`_write_to_file`): `clone_model` + `set_weights(private.get_weights())`
  then `save` carries the count. A SavedModel (`model.export()`,
  `keras.export.ExportArchive`) carries the segments of each variable it
  holds that has a ledger or remembered values (`_write_to_saved_model`: a
  non-trainable float64 table beside those variables, never a secret), and
  `tf.saved_model.load` (TFSMLayer's too) remembers the values it loads
  with them (`_restore_from_saved_model`): a model rebuilt with
  `set_weights` from the loaded variables gets the count back.
  `keras.saving.KerasFileEditor(path)`, which reads a Keras file's arrays
  without loading them into a model (`weights_dict`), remembers them with
  the ledger entries of the file (`_remember_file_values`).
  `tf.saved_model.save` of a Keras model or layer with such weights, which
  could carry no entry, is refused (`before_saving_saved_model`).
* **Weights copied as arrays in this process** (`clone_model` then
  `set_weights(private.get_weights())`, a layer's `set_weights`, the EMA
  weights read inside `ema_weights()`) are recognised by their values: at
  the end of every epoch and of every fit, and after every update when a
  callback runs code between updates, private training remembers a
  fingerprint of each weight it changed, EMA shadows included
  (`remember`; never forgotten; a value remembered again keeps what was
  known of it), and so does loading a file or checkpoint with a ledger
  (`_remember_loaded`); a private model built over, or trained from, a
  weight with such a fingerprint takes the ledger it went through
  (`recall`, also after the callbacks' `on_train_begin` and first
  `on_epoch_begin`, where a warm start may set weights, and, when a
  callback runs code between updates, before every update for the weights
  a callback changed since the last one). The fingerprint
  is of the values as float64, whatever their dtype and shape (a lossless
  copy into float64 variables, a Dense kernel reused as a 1x1 convolution
  kernel are recognised); a copy whose values changed (a cast to float16,
  pruning, an average of several models' weights) is not. Two runs with
  the same seeds in one process leave the same values: a value met in both
  takes both histories (an over-count).
* **Segments: one history met twice is merged, two histories are added.**
  Each ledger has a random `uid` and advances only its own counts, its
  segment. What it learns from elsewhere (a file, a ledger it absorbs, a
  remembered fingerprint) it keeps as base segments, by uid. Two copies of
  one segment are snapshots of it (lower bounds of its count): they merge
  by maximum. Segments of different uids are added. Files, checkpoints and
  remembered fingerprints carry every segment. So restoring older weights
  (EarlyStopping, an older checkpoint, the model's own file) never rewinds
  nor doubles the count, while two branches forked from one file and
  trained apart add both branches' updates when their weights meet again
  (had both taken the file's uid as their own, a maximum would drop one
  branch). No ledger ever takes another's uid, not even a `DPCheckpoint`
  restore (`restoring_checkpoint`): nothing tells the one continuation of a
  run from a copy of its checkpoint restored elsewhere, and counting the
  checkpoint's segment as a base one is exact in both cases. A ledger's
  counters (`dp_steps`) hold its total, base segments included, and only
  move forward.

What the ledger cannot follow: arrays that leave the process (pickled
`get_weights`), a file loaded before tan_keras is imported (nothing
reads the entry then; plain Keras skips it), a Keras weight file's arrays
read with `h5py` by hand (no Keras or TensorFlow reader sees them), a `tf.train.Checkpoint` of
bare variables (`Checkpoint(weights=model.weights)`: no layer to hold the
entry), and values copied into a variable of another shape (a widened
layer, a grown head: the fingerprint is of the whole variable), nor
weights read out of an ONNX, LiteRT or OpenVINO export. A trainable
`TFSMLayer` is refused (weights trained through it go to no file).
"""

from __future__ import annotations

import contextlib
import secrets
import weakref
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import keras
import numpy as np

from tan_keras import _fingerprints, _keras_internals, _keras_saving, _validate
from tan_keras.privacy import releases

# The ledger runs on both Keras backends. On TensorFlow its counters are
# variables the compiled train step advances, and checkpoints and
# SavedModels carry it too; on JAX (no TensorFlow) the counters live on the
# host, where the JAX model counts its steps, and Keras weight files carry it.
_TENSORFLOW = keras.backend.backend() == "tensorflow"
if _TENSORFLOW:
    import tensorflow as tf

# The attribute that binds a variable, or a model, to its ledger.
_ATTRIBUTE = "_tan_keras_ledger"
# The name of the ledger's entry in Keras weight files and TF checkpoints.
SAVED_NAME = "privacy_ledger"
_CHECKPOINT_NAME = "dp_ledger"
# The attribute of a private model holding the fingerprints of the values its
# traced computation holds (`DPKerasModel._check_held_values`).
HELD_VALUES_ATTRIBUTE = "_tan_keras_held_values"

# A segment: the counts (steps, epochs) of one history, by mechanism.
Segment = Dict[releases.Mechanism, Tuple[int, int]]
# Every segment a ledger knows of, by uid.
Segments = Dict[int, Segment]
# uids are 52-bit, so that a float64 table holds them exactly.
_UID_BITS = 52


def _new_uid() -> int:
    return secrets.randbits(_UID_BITS)


def replicated_counter(value: int, name: str) -> tf.Variable:
    """An int64 counter that every replica updates alike (first replica's value kept)."""
    return tf.Variable(
        value,
        dtype=tf.int64,
        trainable=False,
        name=name,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
    )


class HostCounter:
    """An integer counter on the host, read and written like a counter variable.

    The JAX backend's: its model counts each logical step on the host.
    """

    def __init__(self, value: int):
        self._value = int(value)

    def numpy(self) -> int:
        return self._value

    def __int__(self) -> int:
        return self._value

    __index__ = __int__

    def __eq__(self, other) -> bool:
        # `model.dp_steps == 24` compares the count (it was an int on JAX).
        try:
            return self._value == int(other)
        except (TypeError, ValueError):
            return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return f"HostCounter({self._value})"

    def assign(self, value) -> None:
        self._value = int(value)

    def assign_add(self, value) -> None:
        self._value += int(value)


def _strategy():
    """The tf.distribute strategy counters are made under (None on JAX)."""
    return tf.distribute.get_strategy() if _TENSORFLOW else None


class _Counters:
    """The counts of one mechanism: `steps`, `epochs` (int64 variables on TensorFlow)."""

    def __init__(self, steps: int = 0, epochs: int = 0):
        if _TENSORFLOW:
            with tf.init_scope():
                self.steps = replicated_counter(steps, "dp_steps")
                self.epochs = replicated_counter(epochs, "dp_epochs")
        else:
            self.steps, self.epochs = HostCounter(steps), HostCounter(epochs)
        self.strategy = _strategy()
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
        # Names this ledger's own segment wherever its weights go (module doc).
        self.uid = _new_uid()
        # The counters hold the totals: the own segment plus every base one.
        self._counters: Dict[releases.Mechanism, _Counters] = {}
        # What it learned from elsewhere: {uid: segment}, never its own uid.
        self._base: Segments = {}
        self._absorbed_into: Optional[PrivacyLedger] = None
        self._position: Optional[_Counters] = None

    # ----------------------------------------------------------------- reading
    def root(self) -> PrivacyLedger:
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

    def unchecked_sampling(self) -> bool:
        """Whether some counted updates were on micro-batches nothing checked.

        Returns:
          True when the weights went through updates of a model with
          sampling="caller_poisson" (`releases.Mechanism.unchecked`), here
          or in any history merged in (a file, a copy of the weights).
        """
        return releases.unchecked_sampling(self.entries())

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
        if current is not None and current.strategy is not _strategy():
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
        strategy = _strategy()
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
        """Adds `entries`, a history of unknown origin, as a segment of its own.

        Adding never under-counts; a history met again must come with its
        uid (a file, a checkpoint) to be merged instead.
        """
        self.root()._merge_segments({_new_uid(): _segment(entries)})

    def merge_table(self, table) -> None:
        """`merge` of a table in the format of `table()` (`releases.from_table`)."""
        self.merge(releases.from_table(table))

    # ---------------------------------------------------------------- segments
    def segments(self) -> Segments:
        """Every segment the counts add up: {uid: {mechanism: (steps, epochs)}}.

        The own segment (under `uid`, every mechanism of the ledger) and the
        base segments (those with counts).
        """
        root = self.root()
        segments = {uid: dict(segment) for uid, segment in root._base.items()}
        segments[root.uid] = root._own()
        return segments

    def _base_sum(self, mechanism: releases.Mechanism) -> Tuple[int, int]:
        steps = epochs = 0
        for segment in self._base.values():
            s, e = segment.get(mechanism, (0, 0))
            steps, epochs = steps + s, epochs + e
        return steps, epochs

    def _own(self) -> Segment:
        """The own segment: each counter less the base segments' counts."""
        own = {}
        for mechanism, counters in self._counters.items():
            steps, epochs = counters.values()
            base_steps, base_epochs = self._base_sum(mechanism)
            own[mechanism] = (max(steps - base_steps, 0), max(epochs - base_epochs, 0))
        return own

    def _merge_segments(self, segments: Segments) -> None:
        """Merges snapshots of segments: per uid by maximum, across uids added.

        A segment under this ledger's own uid raises its own counts.

        Raises:
          ValueError: if the ledger would mix Poisson and shuffled sampling.
        """
        root = self.root()
        mechanisms = {m for segment in segments.values() for m in segment}
        releases.check_adjacency([*mechanisms, *root._counters])
        for uid, segment in segments.items():
            for mechanism, (steps, epochs) in segment.items():
                # Existing counters as they are (a file loaded outside the
                # strategy scope the model was built in).
                counters = root._counters.get(mechanism) or root.counters(mechanism)
                current_steps, current_epochs = counters.values()
                if uid == root.uid:
                    base_steps, base_epochs = root._base_sum(mechanism)
                    counters.raise_to(base_steps + steps, base_epochs + epochs)
                    continue
                old = root._base.get(uid, {}).get(mechanism, (0, 0))
                new = (max(old[0], steps), max(old[1], epochs))
                if new == old:
                    continue
                root._base.setdefault(uid, {})[mechanism] = new
                counters.steps.assign(current_steps + new[0] - old[0])
                counters.epochs.assign(current_epochs + new[1] - old[1])
        root._sync_position()

    def _live(self) -> bool:
        root = self.root()
        counters = list(root._counters.values())
        if root._position is not None:
            counters.append(root._position)
        return any(len(c.owners) for c in counters)

    def _absorb(self, other: PrivacyLedger) -> None:
        """Takes `other`'s segments (its own one as a base one) and makes it point here."""
        root, other = self.root(), other.root()
        if other is root:
            return
        root._merge_segments(other.segments())
        other._absorbed_into = root


def has_ledger(objects: Iterable) -> bool:
    """Whether any of `objects` (variables or models) is bound to a ledger (merges nothing)."""
    return any(
        isinstance(getattr(obj, _ATTRIBUTE, None), (PrivacyLedger, _LedgerSaveable))
        for obj in objects
    )


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
    """Makes `obj` (a Keras model or layer) write and read `ledger` with its weights.

    Keras weight files (`save_weights`, `.keras`, the callbacks that use
    them) find it as the `privacy_ledger` attribute; `tf.train.Checkpoint`
    as the `dp_ledger` dependency. It is not a weight: `get_weights` and
    `set_weights` do not see it. Attached to every layer that holds weights,
    it goes into the file of any model built from those layers (a feature
    extractor cut from a private model, saved as a plain Keras model).
    """
    object.__setattr__(obj, _ATTRIBUTE, _LedgerSaveable(ledger))
    if _TENSORFLOW:
        obj._track_trackable(_LedgerTensors(ledger, obj), name=_CHECKPOINT_NAME, overwrite=True)


def _segment(entries: Iterable[releases.LedgerEntry]) -> Segment:
    segment: Segment = {}
    for entry in entries:
        steps, epochs = segment.get(entry.mechanism, (0, 0))
        segment[entry.mechanism] = (max(steps, entry.steps), max(epochs, entry.epochs))
    return segment


def _checked_uid(row: np.ndarray) -> int:
    """The uid in column 0 of a segments table's `row`."""
    uid = row[0]
    if not np.isfinite(uid) or uid != int(uid) or not 0 <= uid < 2**_UID_BITS:
        raise _validate.invalid("table", f"integral uids in [0, 2**{_UID_BITS})", row.tolist())
    return int(uid)


def segments_table(segments: Segments) -> np.ndarray:
    """Segments as a float64 table [rows, 1 + TABLE_COLUMNS]: the uid, a `to_table` row."""
    rows = [
        np.concatenate([[float(uid)], row])
        for uid, segment in segments.items()
        for row in releases.to_table(
            [releases.LedgerEntry(m, steps, epochs) for m, (steps, epochs) in segment.items()]
        )
    ]
    return np.asarray(rows, np.float64).reshape(len(rows), 1 + releases.TABLE_COLUMNS)


def segments_from_table(table) -> Segments:
    """The segments a table written by `segments_table` holds (merged per uid by maximum).

    Raises:
      ValueError: naming `table`, if it is not such a table.
    """
    array = np.asarray(table, np.float64)
    if array.size == 0:
        return {}
    if array.ndim != 2 or array.shape[1] != 1 + releases.TABLE_COLUMNS:
        raise _validate.invalid(
            "table",
            f"a privacy ledger segments table of shape [rows, {1 + releases.TABLE_COLUMNS}]",
            array.shape,
        )
    segments: Segments = {}
    for row in array:
        merged = segments.setdefault(_checked_uid(row), {})
        for mechanism, counts in _segment(releases.from_table(row[None, 1:])).items():
            old = merged.get(mechanism, (0, 0))
            merged[mechanism] = (max(old[0], counts[0]), max(old[1], counts[1]))
    return segments


def _segments_of_store(store) -> Segments:
    """The segments a Keras weight-file entry holds: "2", or the total "0" of an older file."""
    keys = list(store.keys())
    if "2" in keys:
        return segments_from_table(np.asarray(store["2"]))
    if "0" in keys:
        # Written before segments: a history of unknown uid, added.
        segment = _segment(releases.from_table(np.asarray(store["0"])))
        return {_new_uid(): segment} if segment else {}
    return {}


class _LedgerSaveable(keras.layers.Layer):
    """The ledger as Keras saving sees it: a layer with its tables, merged on load.

    "0" is the total table (`releases.to_table`), "1" the writer's uid, "2"
    the segments (`segments_table`).
    """

    def __init__(self, ledger: PrivacyLedger):
        super().__init__(name=SAVED_NAME, trainable=False)
        object.__setattr__(self, "ledger", ledger)

    def save_own_variables(self, store):
        root = self.ledger.root()
        store["0"] = root.table()
        store["1"] = np.asarray([root.uid], np.int64)
        store["2"] = segments_table(root.segments())

    def load_own_variables(self, store):
        # A file written before the ledger existed, or by a plain model,
        # has no table: nothing to merge (the ledger never moves back).
        self.ledger.root()._merge_segments(_segments_of_store(store))


def _checkpoint_table(ledger: PrivacyLedger) -> np.ndarray:
    """A header row (the writer's uid, then zeros), then `segments_table` rows."""
    root = ledger.root()
    header = np.zeros((1, 1 + releases.TABLE_COLUMNS), np.float64)
    header[0, 0] = float(root.uid)
    return np.concatenate([header, segments_table(root.segments())])


def _from_checkpoint_table(table) -> Tuple[Optional[int], Segments]:
    """(writer's uid, segments) of a `_checkpoint_table`, or of an older total table."""
    array = np.asarray(table, np.float64)
    if array.ndim == 2 and array.shape[1] == releases.TABLE_COLUMNS:
        # Written before segments (or empty): a history of unknown uid, added.
        segment = _segment(releases.from_table(array))
        return None, ({_new_uid(): segment} if segment else {})
    if array.ndim != 2 or not len(array) or np.any(array[0, 1:]):
        raise _validate.invalid(
            "table", "a privacy ledger checkpoint table written by tan_keras", array.shape
        )
    return _checked_uid(array[0]), segments_from_table(array[1:])


class _LedgerTensors(tf.__internal__.tracking.Trackable if _TENSORFLOW else object):
    """The ledger as `tf.train.Checkpoint` sees it: one tensor, merged on restore.

    One tensor, `_checkpoint_table` (a second one would make every
    checkpoint written before it unreadable). The values the checkpoint
    restores into its owner's variables are remembered with the segments
    restored (`_remember_restored`), once the restore is over.
    """

    def __init__(self, ledger: PrivacyLedger, owner=None):
        self._ledger = ledger
        self._owner = None if owner is None else weakref.ref(owner)
        # Set by `before_saving_saved_model` (its graph cannot read the counters).
        self.table_before_saving = None

    def _serialize_to_tensors(self):
        if tf.executing_eagerly():
            table = _checkpoint_table(self._ledger)
        else:
            # tf.saved_model.save writes it from a graph, where the counters
            # cannot be read: the table read before the save began.
            table = self.table_before_saving
        return {"table": tf.constant(table, tf.float64)}

    def _restore_from_tensors(self, restored_tensors):
        if not tf.executing_eagerly():
            # tf.saved_model.save traces a restore function; a SavedModel
            # carries the ledger in its own entry (`_add_saved_model_entry`).
            return tf.no_op()
        uid, segments = _from_checkpoint_table(restored_tensors["table"].numpy())
        if _RESTORING:
            # A DPCheckpoint's restore: merged when it is over (`restoring_checkpoint`).
            _RESTORING[-1].append((self._ledger, uid, segments))
        else:
            self._ledger.root()._merge_segments(segments)
        owner = None if self._owner is None else self._owner()
        if owner is not None and uid is not None:
            # The owner's variables may be restored after this tensor: their
            # values are read once the restore is over.
            _LOADED.append((_keras_internals.own_variables(owner), segments))
        return tf.no_op()


# The ledger tables a DPCheckpoint restore met so far (`restoring_checkpoint`).
_RESTORING: List[list] = []


@contextlib.contextmanager
def restoring_checkpoint(ledger: PrivacyLedger, counters: Sequence[tf.Variable]):
    """Restores a DPCheckpoint's ledger, around its `tf.train.Checkpoint` restore.

    The checkpoint restores the model's counters (`counters`: `dp_steps`,
    `dp_epochs`: totals) and its ledger tables; the checkpoint's own segment
    becomes a base segment of `ledger` like the others, so that every run
    restored from it counts its own updates apart. The counters never move
    back, even when the restore fails.

    Args:
      ledger: The model's ledger.
      counters: The counter variables the checkpoint restores.
    """
    before = [int(c.numpy()) for c in counters]
    met: list = []
    _RESTORING.append(met)
    succeeded = False
    try:
        yield
        succeeded = True
    finally:
        del _RESTORING[next(i for i, m in enumerate(_RESTORING) if m is met)]
        restored = [int(c.numpy()) for c in counters]
        # The counters as they were: the tables, merged, bring the rest.
        for counter, value in zip(counters, before):
            counter.assign(value)
        root = ledger.root()
        # Tables of an older version (no uid): all of one checkpoint were
        # written from one ledger at once, one history.
        older = _new_uid()
        for owner, uid, segments in met:
            if uid is None:
                # Its one segment (`_from_checkpoint_table`), under the shared uid.
                segments = dict(zip([older], segments.values()))
            target = owner.root()
            try:
                target._merge_segments(segments)
            except ValueError:
                if succeeded:
                    raise
        # A checkpoint without tables (or a refused one) still never rewinds.
        for counter, value in zip(counters, restored):
            counter.assign(max(int(counter.numpy()), value))
        root._sync_position()
        _remember_restored()


# Fingerprints of weight values private training left, or a file with a
# ledger loaded -> every segment they are known to have gone through (merged
# per uid by maximum: what is known of a value only grows). Never evicted: a
# copy of early weights is recognised however long training went on. An
# entry is an int and a reference to segments shared by the whole call of
# `remember` (tens of bytes); a collision of two 64-bit fingerprints could
# only add a history to a model, never remove one.
_REMEMBERED: Dict[int, Segments] = {}
# Variables a `tf.train.Checkpoint` restore wrote, with the segments its
# ledger tables held, to remember once the restore is over (`_remember_restored`).
_LOADED: List[Tuple[List, Segments]] = []


def _values(variable):
    """A variable's values as an array."""
    if _TENSORFLOW:
        return variable.numpy()
    # (Keras's `Variable.numpy()` warns on JAX with numpy 2.)
    return np.asarray(variable.value)


def _fingerprint(variable) -> int:
    """A 64-bit hash of one variable's values, as float64, in any dtype or shape."""
    return _fingerprints.value_fingerprint(_values(variable))


def _layer_weights(model) -> List:
    """The weights of `model`'s layers, each once (not the model's own, e.g. EMA)."""
    seen, weights = set(), []
    for layer in model.layers:
        for variable in layer.weights:
            if id(variable) not in seen:
                seen.add(id(variable))
                weights.append(variable)
    return weights


def fingerprints(variables: Iterable) -> Dict[int, int]:
    """{id(variable): fingerprint} of `variables`' current values."""
    return {id(v): _fingerprint(v) for v in variables}


def remember(
    variables: Iterable,
    ledger: PrivacyLedger,
    unless: Dict[int, int],
    found: Optional[Dict[int, int]] = None,
) -> None:
    """Records that the current values of `variables` went through `ledger`'s releases.

    One fingerprint per variable, so that a copy of some layers (a backbone
    under a new head, the EMA shadows swapped in) is recognised too.

    Args:
      variables: The trained model's weights, its EMA shadows included.
      ledger: Its ledger.
      unless: The fingerprints at the start of the fit: a variable that did
        not change (frozen, or a zero update) is not recorded, since other
        models hold the same initial values.
      found: The fingerprints of `variables`' current values, if already
        taken ({id(variable): fingerprint}, `fingerprints`).
    """
    _remember_restored()
    _remember_values(variables, ledger.root().segments(), unless, found)


def _remember_values(variables: Iterable, segments: Segments, unless=None, found=None) -> None:
    """Records that the current values of `variables` went through `segments`.

    A matrix is remembered transposed too. A value already known keeps
    what was known of it: segments are merged
    per uid by maximum, so a second model that holds the same values (a
    copy made before, a warm start) never replaces a longer history with
    its own.
    """
    unless, found = unless or {}, found or {}
    for variable in variables:
        fingerprint = found.get(id(variable))
        if fingerprint is None:
            fingerprint = _fingerprint(variable)
        if unless.get(id(variable)) == fingerprint:
            continue
        _REMEMBERED[fingerprint] = _merged(_REMEMBERED.get(fingerprint), segments)
        for other in _rearranged_fingerprints(variable):
            _REMEMBERED[other] = _merged(_REMEMBERED.get(other), segments)


def _rearranged_fingerprints(variable) -> List[int]:
    """Fingerprints of the usual rearranged copies of a variable's values.

    A matrix's transpose: the tied decoder of an autoencoder
    (`Dense(...).set_weights([W.T, b])`, review round 9).
    """
    if len(getattr(variable, "shape", ())) != 2:
        return []
    return [_fingerprints.value_fingerprint(np.asarray(_values(variable)).T)]


def _merged(known: Optional[Segments], segments: Segments) -> Segments:
    """`known` and `segments` merged per uid by maximum (`known` itself if nothing new)."""
    if known is None or known is segments:
        return segments
    merged = {uid: dict(segment) for uid, segment in known.items()}
    changed = False
    for uid, segment in segments.items():
        target = merged.setdefault(uid, {})
        for mechanism, (steps, epochs) in segment.items():
            old = target.get(mechanism, (0, 0))
            new = (max(old[0], steps), max(old[1], epochs))
            if new != old:
                target[mechanism] = new
                changed = True
    return merged if changed else known


def _remember_loaded(variables: Iterable, segments: Segments) -> None:
    """Records that values a file or checkpoint loaded went through its `segments`.

    So that a copy of them taken as arrays (`set_weights(loaded.get_weights())`
    into a rebuilt model) is recognised like a copy of trained weights.
    """
    _remember_values(variables, segments)


def _remember_restored() -> None:
    """Remembers the values of the variables `tf.train.Checkpoint` restores wrote.

    Called once a `DPCheckpoint` restore is over, else before the next look-up
    (`recall`, `remember`): a plain restore gives no sign that it is over.
    """
    while _LOADED:
        variables, segments = _LOADED.pop()
        _remember_loaded(variables, segments)


@contextlib.contextmanager
def carried_through_plain_training(model):
    """Remembers the values plain training leaves with what the values it started from went through.

    A plain copy of private weights (`clone_model` then `set_weights`)
    trained further by plain Keras (`fit` or `train_on_batch`, on public
    data) holds new values, which no fingerprint knew: made private next,
    it would count from zero. Every value the training leaves depends on
    all the values it started from, so each changed weight is remembered
    with the merged history of all of them.

    Args:
      model: The plain Keras model about to train.

    Yields:
      Nothing; on exit (even after an error: some steps may have run) the
      changed weights are remembered.
    """
    _remember_restored()
    if not _REMEMBERED:
        yield
        return
    variables = list(model.weights)
    before = fingerprints(variables)
    segments = _segments_of_values(variables)
    try:
        yield
    finally:
        if segments:
            _remember_values(variables, segments, unless=before)


def recall(model, ledger: PrivacyLedger, since: Optional[Dict[int, int]] = None) -> Dict[int, int]:
    """Merges into `ledger` what any of `model`'s weights went through, if known.

    Args:
      model: A private model (its layers' weights are looked up).
      ledger: Its ledger.
      since: Fingerprints taken earlier ({id(variable): fingerprint}): if
        given, only the weights whose values differ from them are looked up
        (set since by code other than the model's update, mid-fit), not the
        values held by its traced computation (fixed for the fit).

    Returns:
      The fingerprints of the model's layers' weights (for `remember`'s `unless`).
    """
    _remember_restored()
    found = fingerprints(_layer_weights(model))
    if since is not None:
        looked_up = {f for key, f in found.items() if since.get(key) != f}
    else:
        # The values its traced computation holds besides its weights (a
        # constant copy of private weights, statistics a private release set).
        looked_up = set(found.values()) | set(getattr(model, HELD_VALUES_ATTRIBUTE, ()))
    for fingerprint in looked_up:
        segments = _REMEMBERED.get(fingerprint)
        if segments is not None:
            ledger.root()._merge_segments(segments)
    return found


def _restore_from_file(obj, read) -> None:
    """Binds a layer Keras just loaded to the ledger its file holds beside it.

    A layer of a private model loads its ledger through its own attribute.
    A layer that has none (a plain Keras model loaded in a fresh process: a
    feature extractor cut from a private model, the wrapped model's own
    file) finds the entry at the same place and takes it, so that a private
    model built over it later counts on top of what its weights went through.
    Each layer gets a ledger of its own; a model over several layers of one
    file merges their ledgers' segments, per uid, by maximum (`ledger_of`).

    Either way the values loaded are remembered with the segments the file
    holds (`_remember_loaded`), so that a copy of them taken as arrays
    (`set_weights(loaded.get_weights())` into a rebuilt model) is recognised.
    """
    if not isinstance(obj, keras.layers.Layer) or isinstance(obj, _LedgerSaveable):
        return
    store = read(_ATTRIBUTE)
    keys = list(store.keys())
    if "0" not in keys and "2" not in keys:
        return
    segments = _segments_of_store(store)
    if not isinstance(obj.__dict__.get(_ATTRIBUTE), _LedgerSaveable):
        ledger = (ledger_of(obj.weights) or PrivacyLedger()).root()
        ledger._merge_segments(segments)
        bind(ledger, obj.weights)
        attach(obj, ledger)
    if "2" in keys:
        # (An older file's history has no uid: met again, it would be added.)
        _remember_loaded(_keras_internals.own_variables(obj), segments)


def _write_to_file(obj, make) -> None:
    """Writes the ledger entry of a layer Keras just saved, if it has none of its own.

    A layer that holds values private training left (or a file with a ledger
    brought), copied as arrays into a plain model (`clone_model` then
    `set_weights(private.get_weights())`), is saved with the segments those
    values went through (`_REMEMBERED`), at the place a private layer writes
    its ledger: loading the file brings them back (`_restore_from_file`),
    in this process or a fresh one.
    """
    if not _REMEMBERED or not isinstance(obj, keras.layers.Layer):
        return
    if isinstance(obj, _LedgerSaveable) or isinstance(
        obj.__dict__.get(_ATTRIBUTE), _LedgerSaveable
    ):
        return
    segments: Segments = {}
    for variable in _keras_internals.own_variables(obj):
        known = _REMEMBERED.get(_fingerprint(variable))
        if known is not None:
            segments = _merged(segments, known) if segments else known
    if not segments:
        return
    totals: Segment = {}
    for segment in segments.values():
        for mechanism, (steps, epochs) in segment.items():
            old = totals.get(mechanism, (0, 0))
            totals[mechanism] = (old[0] + steps, old[1] + epochs)
    # The entry `_LedgerSaveable` writes, for a writer with no segment of its own.
    store = make(_ATTRIBUTE)
    store["0"] = releases.to_table([releases.LedgerEntry(m, *c) for m, c in totals.items()])
    store["1"] = np.asarray([_new_uid()], np.int64)
    store["2"] = segments_table(segments)


def _file_entries(group) -> Dict[Tuple[str, ...], Segments]:
    """The ledger entries of a Keras weight file, by the path of the object each was written beside.

    `group` is the file's root (`h5py`), as `KerasFileEditor` reads it. A
    path is that of the object's arrays in the editor's tree: the file's
    components less its "vars" groups (`layers/dense/vars/0` is
    `weights_dict["layers"]["dense"]["0"]`). Only entries with segments
    ("2") count: an older file's history has no uid, and met again it would
    be added.
    """
    names: List[str] = []
    group.visit(names.append)
    entries: Dict[Tuple[str, ...], Segments] = {}
    for name in names:
        parts = name.split("/")
        if parts[-1] != "2" or _ATTRIBUTE not in parts[:-1]:
            continue
        at = len(parts) - 1 - parts[::-1].index(_ATTRIBUTE)
        if parts[at + 1 : -1] not in ([], ["vars"]):
            continue
        path = tuple(part for part in parts[:at] if part != "vars")
        found = segments_from_table(np.asarray(group[name][()]))
        known = entries.get(path)
        entries[path] = _merged(known, found) if known else found
    return entries


def _remember_file_values(
    tree, entries: Dict[Tuple[str, ...], Segments], path: Tuple[str, ...] = (), inherited=None
) -> None:
    """Remembers the arrays of a Keras weight file read as a tree, with its ledger entries.

    `keras.saving.KerasFileEditor(path).weights_dict` (a `.weights.h5` or
    `.keras` file) gives the file's arrays as nested dicts (without the
    layers' ledger entries: `_file_entries` reads them from the file). An
    entry covers the arrays of the object it was written beside, nested
    ones included (the model's covers every layer, a layer's its own
    variables); arrays set into a rebuilt model (`set_weights`) are then
    recognised like values `load_weights` loaded. Constant arrays (a zero
    bias, an initial moving mean) are not remembered: other models hold
    them too.
    """
    if not isinstance(tree, dict):
        return
    segments = inherited or {}
    found = entries.get(path)
    if found:
        segments = _merged(segments, found) if segments else found
    for key, value in tree.items():
        if key == _ATTRIBUTE:
            continue
        if isinstance(value, dict):
            _remember_file_values(value, entries, path + (key,), segments)
        elif _has_counts(segments):
            _remember_array(value, segments)


def _remember_array(value, segments: Segments) -> None:
    """Remembers one array read from a file (and a matrix's transpose) with `segments`."""
    value = np.asarray(value)
    if value.dtype.kind not in "biuf" or value.size < 2 or np.all(value == value.flat[0]):
        return
    arrangements = [value] + ([value.T] if value.ndim == 2 else [])
    for arranged in arrangements:
        fingerprint = _fingerprints.value_fingerprint(arranged)
        _REMEMBERED[fingerprint] = _merged(_REMEMBERED.get(fingerprint), segments)


def after_reading_weight_file(group, weights_dict) -> None:
    """`KerasFileEditor`'s hook (`tan_keras._keras_saving`): `_remember_file_values`.

    Args:
      group: The root of the file read (`h5py`), still open.
      weights_dict: The tree of its arrays the editor read.
    """
    entries = _file_entries(group)
    if entries:
        _remember_file_values(weights_dict, entries)


def after_loading_each_object(obj, read) -> None:
    """Keras's load hook (`tan_keras._keras_saving`): `_restore_from_file`."""
    # Looked up at each call, so that tests can see what happens without it.
    _restore_from_file(obj, read)


def after_saving_each_object(obj, make) -> None:
    """Keras's save hook (`tan_keras._keras_saving`): `_write_to_file`."""
    _write_to_file(obj, make)


# ------------------------------------------------------------------ SavedModels
# The ledger's entry in a SavedModel: an attribute of its root, whose
# `groups` each hold `variables` and their `segments` (a `segments_table`).
SAVED_MODEL_ENTRY = _keras_saving.SAVED_MODEL_ENTRY


def _has_counts(segments: Segments) -> bool:
    return any(any(counts) for segment in segments.values() for counts in segment.values())


def _backing(variable):
    """The TensorFlow variable a Keras variable holds its values in (else itself)."""
    value = variable.value if isinstance(variable, keras.Variable) else variable
    # In an autocast scope `value` is a cast tensor: no match, values only.
    return value if isinstance(value, tf.Variable) else variable


def _saved_variables(root) -> List:
    """The variables (Keras or TensorFlow) an export archive's `root` holds, each once."""
    try:
        found = tf.train.TrackableView(root).descendants()
    except TypeError:
        # (Keras's own walk of tracked objects can fail so on some Pythons.)
        found = [*getattr(root, "_all_variables", ()), *getattr(root, "variables", ())]
    seen, variables = set(), []
    for obj in found:
        if isinstance(obj, (keras.Variable, tf.Variable)) and id(obj) not in seen:
            seen.add(id(obj))
            variables.append(obj)
    return variables


def _segments_of_saved(variable, keras_of: Dict[int, object]) -> Segments:
    """What the values of a variable an archive holds went through: its ledger, its values'."""
    keras_variable = keras_of.get(id(variable), variable)
    ledger = getattr(keras_variable, _ATTRIBUTE, None)
    segments: Segments = ledger.root().segments() if isinstance(ledger, PrivacyLedger) else {}
    known = _REMEMBERED.get(_fingerprint(variable))
    if known is not None:
        segments = _merged(segments, known) if segments else known
    return segments


def _write_to_saved_model(archive) -> None:
    """Adds to an export archive the ledger segments of the variables it will write.

    Like a Keras weight file (`_write_to_file`), a SavedModel carries what
    its weights went through: the ledger bound to a private model's (or its
    wrapped model's) variables, the segments remembered for their values
    (a plain model that `set_weights` filled with private values). Variables
    with the same segments form a group: its `variables` (the same objects
    the SavedModel holds anyway) and `segments`, a non-trainable float64
    variable holding their `segments_table` (counts and uids only: never the
    noise key, which no private model tracks). The serving endpoints do not
    read it. An archive without such variables is written as before.

    Args:
      archive: A Keras `ExportArchive`, its resources gathered.
    """
    root = archive._tf_trackable
    # The endpoints capture TensorFlow variables; the ledger is bound to the
    # Keras variables that hold them (those of the layers the archive tracks).
    keras_of: Dict[int, object] = {}
    for resource in getattr(archive, "_tracked", ()):
        if isinstance(resource, keras.layers.Layer):
            for variable in resource.variables:
                keras_of[id(_backing(variable))] = variable
    _add_saved_model_entry(root, keras_of)
    # tf.saved_model.save, which the archive calls next, keeps this entry.
    _EXPORT_ROOTS.add(root)


# The roots export archives gave their entries (`before_saving_saved_model`).
_EXPORT_ROOTS = weakref.WeakSet()


def _add_saved_model_entry(root, keras_of: Dict[int, object]) -> None:
    """Sets `root`'s `SAVED_MODEL_ENTRY` to the ledger groups of the variables it holds.

    Args:
      root: The object a SavedModel is written from (an archive's root, or
        the `tf.Module` given to `tf.saved_model.save`).
      keras_of: Keras variables by the id of the TensorFlow variable that
        holds their values, for variables `root` reaches only as TensorFlow
        variables; completed from those it reaches as Keras variables.
    """
    if hasattr(root, SAVED_MODEL_ENTRY):
        # A second write: computed again, from the weights as they are.
        delattr(root, SAVED_MODEL_ENTRY)
    _remember_restored()
    variables = _saved_variables(root)
    for variable in variables:
        if isinstance(variable, keras.Variable):
            keras_of.setdefault(id(_backing(variable)), variable)
    groups: Dict[bytes, Tuple[np.ndarray, List]] = {}
    for variable in variables:
        segments = _segments_of_saved(variable, keras_of)
        if _has_counts(segments):
            table = segments_table(segments)
            groups.setdefault(table.tobytes(), (table, []))[1].append(variable)
    if not groups:
        return
    entries = []
    with tf.init_scope():
        for table, members in groups.values():
            group = tf.__internal__.tracking.AutoTrackable()
            group.variables = members
            group.segments = tf.Variable(
                table, dtype=tf.float64, trainable=False, name="privacy_ledger_segments"
            )
            entries.append(group)
    entry = tf.__internal__.tracking.AutoTrackable()
    entry.groups = entries
    setattr(root, SAVED_MODEL_ENTRY, entry)


def _restore_from_saved_model(root) -> None:
    """Remembers the values a SavedModel with a ledger entry loaded, with its segments.

    So that a model rebuilt in this process with `set_weights` from the
    loaded variables (or over a TFSMLayer of it) takes the ledger when it
    is made private (`recall`), as after loading a Keras weight file.
    """
    if not tf.executing_eagerly():
        # tf.compat.v1 graph mode: the values exist only in a session.
        return
    for group in getattr(getattr(root, SAVED_MODEL_ENTRY), "groups", ()):
        segments = segments_from_table(group.segments.numpy())
        _remember_loaded(list(group.variables), segments)


def _remember_checkpoint_tensors(reader) -> None:
    """Remembers the tensors of a TensorFlow checkpoint with a ledger, with its segments.

    Its tensors read as arrays (`tf.train.load_checkpoint(path).get_tensor`,
    `tf.train.load_variable`) and set into a rebuilt model, in this process
    or after a restart, are then recognised like weights a restore wrote.
    Every ledger table of the checkpoint is merged for every tensor: a
    checkpoint does not say which tables cover which variables, and a
    history too long only makes epsilon larger. Constant tensors (a zero
    bias, a step counter) are not remembered: other models hold them too.
    """
    suffix = f"{_CHECKPOINT_NAME}/.ATTRIBUTES/table"
    names = reader.get_variable_to_shape_map()
    segments: Segments = {}
    for name in names:
        if name.endswith(suffix):
            _, found = _from_checkpoint_table(reader.get_tensor(name))
            segments = _merged(segments, found) if segments else found
    if not _has_counts(segments):
        return
    for name in names:
        if name.endswith(suffix) or name == "_CHECKPOINTABLE_OBJECT_GRAPH":
            continue
        value = np.asarray(reader.get_tensor(name))
        if value.dtype.kind not in "biuf" or value.size < 2 or np.all(value == value.flat[0]):
            continue
        fingerprint = _fingerprints.value_fingerprint(value)
        _REMEMBERED[fingerprint] = _merged(_REMEMBERED.get(fingerprint), segments)


def _ledger_entries_for_checkpoint(root) -> None:
    """Gives the private values a `tf.train.Checkpoint` writes without a ledger one.

    A plain model whose weights were copied from a private one (`clone_model`
    then `set_weights(private.get_weights())`) has no ledger of its own; its
    checkpoint would hold the private values with no entry, and restored in
    a fresh process they would count from zero. Like a Keras weight file
    (`_write_to_file`), the checkpoint gets, as each such layer's `dp_ledger`
    dependency, the segments its values are known to have gone through; the
    layer is not bound to it (it stays a plain layer). Variables reached
    outside any layer (`tf.train.Checkpoint(weights=model.weights)`) get one
    entry on the checkpoint's root. A fresh process that reads the file
    remembers its tensors with them (`_remember_checkpoint_tensors`).
    """
    _remember_restored()
    try:
        objects = tf.train.TrackableView(root).descendants()
    except TypeError:
        return
    covered, loose = set(), {}
    for obj in objects:
        if not isinstance(obj, keras.layers.Layer) or isinstance(obj, _LedgerSaveable):
            continue
        variables = _keras_internals.own_variables(obj)
        covered.update(id(_backing(v)) for v in variables)
        if isinstance(obj.__dict__.get(_ATTRIBUTE), _LedgerSaveable):
            continue  # a private model's layer writes its own ledger
        segments = _segments_of_values(variables)
        if segments:
            _track_detached(obj, segments)
    for obj in objects:
        if isinstance(obj, (keras.Variable, tf.Variable)) and id(_backing(obj)) not in covered:
            loose[id(_backing(obj))] = obj
    segments = _segments_of_values(loose.values())
    if segments and not isinstance(root, keras.layers.Layer):
        _track_detached(root, segments)


def _segments_of_values(variables: Iterable) -> Segments:
    """What `variables` went through: their ledgers' segments and their values'."""
    segments: Segments = {}
    for variable in variables:
        ledger = getattr(variable, _ATTRIBUTE, None)
        found = [ledger.root().segments()] if isinstance(ledger, PrivacyLedger) else []
        known = _REMEMBERED.get(_fingerprint(variable)) if _REMEMBERED else None
        for more in found + ([known] if known is not None else []):
            segments = _merged(segments, more) if segments else more
    return segments if _has_counts(segments) else {}


def _track_detached(obj, segments: Segments) -> None:
    """Makes `obj` write `segments` as its `dp_ledger` checkpoint dependency, unbound."""
    detached = PrivacyLedger()
    detached._merge_segments(segments)
    owner = obj if isinstance(obj, keras.layers.Layer) else None
    obj._track_trackable(_LedgerTensors(detached, owner), name=_CHECKPOINT_NAME, overwrite=True)


def before_writing_checkpoint(root) -> None:
    """`tf.train.Checkpoint`'s save hook (`tan_keras._keras_saving`).

    See `_ledger_entries_for_checkpoint`.
    """
    _ledger_entries_for_checkpoint(root)


def after_opening_checkpoint(reader) -> None:
    """`NewCheckpointReader`'s hook (`tan_keras._keras_saving`): `_remember_checkpoint_tensors`."""
    _remember_checkpoint_tensors(reader)


def after_tracking_export(archive) -> None:
    """Keras's export hook (`tan_keras._keras_saving`): `_write_to_saved_model`."""
    _write_to_saved_model(archive)


def after_loading_saved_model(root) -> None:
    """`tf.saved_model.load`'s hook (`tan_keras._keras_saving`): `_restore_from_saved_model`."""
    _restore_from_saved_model(root)


def _weight_with_ledger(layer) -> Optional[object]:
    """The first weight of `layer` bound to a ledger or holding remembered private values."""
    _remember_restored()
    for variable in layer.weights:
        bound = isinstance(getattr(variable, _ATTRIBUTE, None), PrivacyLedger)
        if bound or (_REMEMBERED and _fingerprint(variable) in _REMEMBERED):
            return variable
    return None


def before_writing_legacy_h5(obj) -> None:
    """The legacy HDF5 writer's hook (`tan_keras._keras_saving`), before the file is opened.

    The legacy format (`model.save("m.h5")`, `keras.saving.save_model(model,
    "m.h5")`, `ModelCheckpoint("best.h5")`) holds no ledger: weights loaded
    from it would count their privacy from zero, in any process. So the file
    is refused, on either backend, by whichever route writes it (a review
    found `keras.saving.save_model` and the wrapped model's own `save`
    writing it, where only the private model's `save` refused).

    Raises:
      ValueError: for a Keras model or layer whose weights have a ledger or
        hold remembered private values.
    """
    if not isinstance(obj, keras.layers.Layer):
        return
    variable = _weight_with_ledger(obj)
    if variable is not None:
        raise ValueError(
            f"Invalid filepath for saving `{obj.name}`: expected a `.keras` or "
            "`.weights.h5` file for weights with a privacy ledger (trained privately, or "
            "copied from weights that were). The legacy HDF5 format (`.h5`, `.hdf5`) holds "
            "no ledger: weights loaded from it would count their privacy from zero. "
            f"Received: a legacy HDF5 file of weight `{variable.path}`, which has a ledger."
        )


def before_saving_saved_model(obj) -> None:
    """`tf.saved_model.save`'s hook (`tan_keras._keras_saving`).

    `tf.saved_model.save(model, path)` of a Keras model writes its layers'
    variables but no ledger entry: a model rebuilt from them would count
    from zero. So a Keras model or layer whose weights have a ledger, or
    hold remembered private values, is refused; `model.export(path)` writes
    the same variables with the ledger.

    Any other object (a `tf.Module` holding a private model, its layers or
    bare variables) gets the ledger entry an export writes
    (`_add_saved_model_entry`), so that `tf.saved_model.load` remembers
    what its values went through, in this process or a fresh one.

    Args:
      obj: The object `tf.saved_model.save` was given.

    Raises:
      ValueError: naming the layer and one such weight.
    """
    if not isinstance(obj, keras.layers.Layer):
        if isinstance(obj, tf.__internal__.tracking.AutoTrackable):
            if obj not in _EXPORT_ROOTS:
                _add_saved_model_entry(obj, {})
            for tensors in tf.train.TrackableView(obj).descendants():
                if isinstance(tensors, _LedgerTensors):
                    tensors.table_before_saving = _checkpoint_table(tensors._ledger)
        return
    variable = _weight_with_ledger(obj)
    if variable is not None:
        raise ValueError(
            f"Invalid object for tf.saved_model.save: `{obj.name}` "
            f"({type(obj).__name__}) has weights with a privacy ledger (trained "
            "privately, or copied from weights that were), and tf.saved_model.save "
            "of a Keras object writes no ledger: a model rebuilt from the SavedModel "
            "would count its privacy from zero. Use "
            f"`{obj.name}.export(path)` or keras.export.ExportArchive (the "
            "SavedModel then carries the ledger), or save a `.keras` / "
            f"`.weights.h5` file. Received: weight `{variable.path}` with a ledger."
        )
