"""Checkpoint and resume everything a DP run needs, and refuse foreign ones.

A resumed DP run must report the same epsilon as an uninterrupted one and
must never replay or skip noise. So a checkpoint holds: the weights, the
optimizer, the EMA shadows, the noisy-update count (`dp_steps`: the
accountant's step count and the noise stream's position), the noise key,
and the Poisson sampler's key and counter. It also holds a fingerprint of
the DP configuration (N, B, sigma, C, K, sampling, and the std of a released
noisy clipped fraction when set): a checkpoint written by a run with
another configuration is refused, since continuing it would account the two
runs' steps under the wrong parameters.

Checkpoints are taken at logical-step boundaries only (the accumulated,
un-noised sum of clipped gradients is never written to disk).

Secrecy: a checkpoint contains the noise key, from which the noise of the
whole run can be regenerated. Keep checkpoints as private as the training
data; publish only the final weights (`model.save_weights`, `model.save`),
which exclude the key.

Restoring is a fork unless told otherwise. Two runs restored from one
checkpoint (a sweep started from one warm start, a copied run directory, a
job resumed twice) would, with the checkpoint's keys, draw the very same
noise and batches for their next updates: the difference of their releases
would carry none. Nothing on disk can tell a first restore from a second (a
copy of the directory carries no trace of the other), so by default a
restore draws a fresh noise key and, for a single-host sampler, a fresh
sampling key from OS entropy: the run continues with the same count,
weights and optimizer, privately, but not bit for bit as the uninterrupted
run would have. `restore(exact_resume=True)` keeps the keys, for a run
resumed after a preemption that nobody else restores (it is then your
promise that the checkpoint is never restored twice; a local checkpoint
restored again is still given fresh noise, as a safety net). Runs with
explicit seeds (`noise_seed`, a seeded sampler) are not private against
whoever knows the seeds and keep them. The privacy ledger counts every
restore's updates apart from the checkpoint's own (`ledger.py`), so forks
add up when their weights meet.
"""

import json
import logging
import os
from typing import Optional, Tuple

import keras
import tensorflow as tf

from tan_keras import _private_files, _validate
from tan_keras.keras_dp import ledger as ledger_lib
from tan_keras.mechanism import noise, per_example, sampling

_FINGERPRINT_KEYS = (
    "l2_norm_clip",
    "noise_multiplier",
    "expected_batch_size",
    "dataset_size",
    "augmult",
    "sampling",
)


class CheckpointError(ValueError):
    """A checkpoint is corrupted or belongs to another DP configuration."""


# In the fingerprint only when set: the count's noise changes the accounted
# noise multiplier, and a checkpoint written before it existed (or without
# it) keeps the fingerprint it had.
_OPTIONAL_FINGERPRINT_KEYS = ("clipped_fraction_std",)


def _fingerprint(model) -> str:
    config = model.dp_config.to_dict()
    fingerprint = {k: config[k] for k in _FINGERPRINT_KEYS}
    fingerprint.update(
        {k: config[k] for k in _OPTIONAL_FINGERPRINT_KEYS if config.get(k) is not None}
    )
    return json.dumps(fingerprint, sort_keys=True)


class DPCheckpoint:
    """Saves and restores the complete state of a DP training run.

    Args:
      directory: Where checkpoints are written.
      model: A compiled `DPKerasModel`.
      sampler: The `PoissonSampler` feeding the model, if any.
      max_to_keep: How many recent checkpoints to keep.

    Raises:
      ValueError: on an invalid argument.
    """

    def __init__(self, directory: str, model, sampler=None, max_to_keep: int = 3):
        if not directory:
            raise _validate.invalid("directory", "a non-empty path", directory)
        self.directory = directory
        self.model = model
        self.sampler = sampler
        self._fingerprint = tf.Variable(_fingerprint(model), trainable=False, dtype=tf.string)
        objects = dict(
            model=model,
            # Keras 3 tracks a model's variables with its own tracker, which
            # tf.train.Checkpoint does not follow past the layers' own
            # weights: the EMA shadows and the random layers' seed states are
            # listed explicitly (in the model's fixed variable order).
            model_variables=[per_example.tf_variable(v) for v in model.variables],
            noise_key=model.noise_key,
            # The ledger is not a model weight (restoring weights must not
            # rewind it); the checkpoint carries it explicitly.
            dp_steps=model.dp_steps,
            # sampling="shuffled" accounts per epoch: its epoch count is
            # part of the ledger too.
            dp_epochs=model.dp_epochs,
            dp_fingerprint=self._fingerprint,
        )
        if model.optimizer is not None:
            objects["optimizer"] = model.optimizer
        if sampler is not None:
            objects["sampler"] = sampler
        self._checkpoint = tf.train.Checkpoint(**objects)
        max_to_keep = _validate.positive_int("max_to_keep", max_to_keep)
        self._manager = tf.train.CheckpointManager(
            self._checkpoint, directory, max_to_keep=max_to_keep
        )

    @property
    def latest(self) -> Optional[str]:
        """Path prefix of the newest checkpoint, or None."""
        return self._manager.latest_checkpoint

    def save(self) -> str:
        """Writes a checkpoint numbered by the model's `dp_steps`.

        Returns:
          The checkpoint's path prefix.

        Raises:
          RuntimeError: if called in the middle of a logical step (the
            accumulated clipped gradients would be lost on resume).
        """
        if not self.model.at_step_boundary():
            raise RuntimeError(
                "DPCheckpoint.save called in the middle of a logical step; save at "
                "step boundaries (DPCheckpointCallback does)."
            )
        # The files hold the noise key and the sampler's key: owner-only.
        _private_files.make_private_dir(self.directory)
        path = self._manager.save(checkpoint_number=int(self.model.dp_steps.numpy()))
        _private_files.restrict(self.directory)
        return path

    def restore(self, path: Optional[str] = None, exact_resume: bool = False) -> int:
        """Restores a checkpoint (default: the latest) and rewinds the sampler.

        Args:
          path: A checkpoint path prefix; None restores the latest one. With no
            checkpoint at all, nothing is restored and 0 is returned.
          exact_resume: Keep the checkpoint's noise and sampling keys, so that
            the run continues exactly as if never interrupted. Only for the
            one continuation of a run: two runs restored with it from one
            checkpoint (or copies of it) release the same noise. False
            (default): fresh keys from OS entropy (see the module doc).

        Returns:
          The privacy ledger after the restore (`dp_steps`): the checkpoint's
          count, or more when this model or a newer checkpoint in the
          directory already released more updates (the ledger never moves
          back; the sampler continues from it).

        Raises:
          CheckpointError: if the checkpoint is unreadable or was written by a
            run with a different DP configuration.
        """
        if not isinstance(exact_resume, bool):
            raise _validate.invalid("exact_resume", "True or False", exact_resume)
        path = path or self.latest
        if path is None:
            return 0
        counters = (self.model.dp_steps, self.model.dp_epochs)
        # Every restore counts its updates apart from the checkpoint's own
        # (ledger.py): a copy of the checkpoint restored elsewhere cannot be
        # told from a first restore, and the forks must add up. Even a
        # refused checkpoint must not leave the ledger rewound.
        with ledger_lib.restoring_checkpoint(self.model.privacy_ledger, counters):
            self._restore_checked(path)
        # The ledger only moves forward. Restoring an older checkpoint (in
        # this process, or while newer ones exist) brings back its weights,
        # not its step count: the updates released after it were spent, and
        # their noise and batches must not be drawn again.
        latest = self._latest_ledger()
        for counter, value in zip(counters, latest):
            counter.assign(max(int(counter.numpy()), value))
        if exact_resume:
            self._fresh_noise_if_restored_before(path)
        else:
            self._fresh_keys()
        spent = int(self.model.dp_steps.numpy())
        self.model.privacy_ledger._sync_position()
        if self.sampler is not None:
            position = int(self.model.sampling_position.numpy())
            self.sampler.resume_at(position, keep_key=exact_resume)
        return spent

    def _fresh_keys(self) -> None:
        """New noise and sampling keys from OS entropy, unless the run chose seeds."""
        if not self.model.noise_seeded:
            self.model.noise_key.assign(noise.make_noise_key())
        if self.sampler is not None and self.sampler.key_is_secret_and_local:
            self.sampler.key.assign(sampling.entropy_int64())

    @staticmethod
    def _restored_before(path: str) -> bool:
        """Whether `path` has its `.resumed` marker (never, for a non-local path)."""
        marker = path + ".resumed"
        return _private_files.is_local(marker) and os.path.exists(marker)

    def _fresh_noise_if_restored_before(self, path: str) -> None:
        """Marks `path` as resumed; re-keys the noise if it already was (see module doc)."""
        marker = path + ".resumed"
        if not _private_files.is_local(marker):
            return
        if self._restored_before(path):
            self.model.noise_key.assign(noise.make_noise_key())
            logging.getLogger("tan_keras").warning(
                "DP checkpoint %s was restored before: this run draws fresh noise (not the "
                "noise the checkpoint's own run would have drawn), so that two runs resumed "
                "from it never release the same noise.",
                path,
            )
            return
        with open(marker, "w") as handle:
            handle.write("resumed\n")
        _private_files.restrict(marker)

    def _restore_checked(self, path: str) -> None:
        expected = self._fingerprint.numpy()
        try:
            status = self._checkpoint.restore(path)
            status.assert_existing_objects_matched()
        except Exception as err:  # noqa: BLE001 -- any unreadable checkpoint is refused
            raise CheckpointError(
                f"Cannot restore DP checkpoint {path!r}: {err}. It is corrupted or was "
                "not written by tan_keras for this model. Refusing to start over at "
                "step 0 silently (that would under-report epsilon): delete the "
                "checkpoint directory to start a new run."
            ) from err
        found = self._fingerprint.numpy()
        if found != expected:
            self._fingerprint.assign(expected)
            raise CheckpointError(
                f"DP checkpoint {path!r} belongs to another DP configuration: "
                f"{found.decode()} != {expected.decode()}. Continuing it would account "
                "its steps under the wrong parameters. Use a new checkpoint directory."
            )

    def _latest_ledger(self) -> Tuple[int, int]:
        """(dp_steps, dp_epochs) of the newest checkpoint in the directory."""
        latest = self.latest
        if latest is None:
            return 0, 0
        try:
            return tuple(
                int(tf.train.load_variable(latest, f"{name}/.ATTRIBUTES/VARIABLE_VALUE"))
                for name in ("dp_steps", "dp_epochs")
            )
        except (tf.errors.NotFoundError, ValueError) as err:
            raise CheckpointError(
                f"DP checkpoint {latest!r} holds no privacy ledger (dp_steps, dp_epochs): it "
                "was not written by this version of tan_keras. Use a new checkpoint directory."
            ) from err


class DPCheckpointCallback(keras.callbacks.Callback):
    """Saves a `DPCheckpoint` every `every_steps` noisy updates and at the end.

    Args:
      checkpoint: The `DPCheckpoint` to write.
      every_steps: Save period in noisy updates.

    Raises:
      ValueError: if `every_steps` is not a positive integer.
    """

    def __init__(self, checkpoint: DPCheckpoint, every_steps: int):
        super().__init__()
        self.checkpoint = checkpoint
        self.every_steps = _validate.positive_int("every_steps", every_steps)
        self._last_saved = None

    def _maybe_save(self, force: bool = False):
        model = self.checkpoint.model
        steps = int(model.dp_steps.numpy())
        if steps == self._last_saved or not model.at_step_boundary():
            return
        if force or steps % self.every_steps == 0:
            self.checkpoint.save()
            self._last_saved = steps

    def on_train_batch_end(self, batch, logs=None):
        self._maybe_save()

    def on_train_end(self, logs=None):
        self._maybe_save(force=True)
