"""`fit` of the JAX `DPKerasModel`: the input checked, the Poisson steps drawn by the model.

A mixin of `dp_model.DPKerasModel` (which keeps its state, config and
train step): everything that happens before Keras's own `fit` runs over
the steps -- the callbacks, arrays or source, validation data, training
rows, preprocessing state and the traced loss checked before any update;
the ledger recalled and remembered around the run; the budget's cap.
"""

import concurrent.futures
import math
import os

from keras import tree

from tan_keras import _keras_internals, _validate
from tan_keras.jax_dp import (
    example_source,
    fit_arrays,
    hosts,
    jax_step,
    poisson_steps,
    step_count,
    traced_loss,
    training_rows,
)
from tan_keras.keras_dp import callback_checks, optimizer_state
from tan_keras.keras_dp import ledger as ledger_lib
from tan_keras.keras_dp.dp_config import DPConfig
from tan_keras.mechanism import held_out, provenance


class FitEntry:
    """`fit` and `train_on_batch` of the private model (module docstring)."""

    def fit(
        self,
        x=None,
        y=None,
        batch_size=None,
        epochs=1,
        validation_split=0.0,
        validation_data=None,
        **kwargs,
    ):
        """Trains on in-memory arrays with Poisson-sampled logical steps.

        Args:
          x: The training inputs: an array, or a dict or list of arrays, with
            one row per example (K views per row when augmult > 1); or a
            random-access source of examples (`len(x)` = N, `x[i]` ->
            (inputs, label), e.g. `tan_keras.data.image_views.AugmentedImages`),
            asked for each drawn example by its own index.
          y: The labels, one row per example (None with a source).
          batch_size: None, or the expected batch size B (the model's).
          epochs: E: the model trains E * round(N / B) noisy steps.
          validation_split: A fraction in [0, 1) of the rows (the last ones)
            held out before sampling and used as validation data.
          validation_data: As in Keras.
          **kwargs: `repeated_rows` ("refuse" or "distinct_people", see
            `_repeated_rows.py`); Keras's (callbacks, verbose, initial_epoch):
            `steps_per_epoch`, `shuffle`, `sample_weight`, `class_weight` refused.

        Returns:
          Keras's History.

        Raises:
          ValueError: for input that is not in-memory arrays, row counts that
            do not match `dataset_size`, a `batch_size` other than B, or a
            refused argument; validation data holding training rows; a
            callback deciding from a noiseless training statistic
            (`callback_checks.py`); preprocessing state computed from data
            that no mark vouches for (`provenance.py`); a model or loss that
            calls back into Python, holds copies of training data or whose
            loss writes a variable, or that uses a collective across devices
            (`traced_loss.py`); an optimizer built for other variables than
            this model's trainable ones (`optimizer_state.py`).
        """
        config = self._dp_config
        # Callbacks deciding from noiseless training statistics, or writing
        # weights without their ledger (callback_checks.py).
        callback_checks.check_fit(self, kwargs.get("callbacks"), self._release_train_metrics)
        # At every fit, not only at compile: `model.optimizer = other` after
        # compile would otherwise bring another model's slots, which Keras's
        # stateless step maps to these variables by position.
        optimizer_state.check_built_for(self.optimizer, self.trainable_variables)
        given_validation = validation_data
        x, y, validation_data = fit_arrays.checked(
            config,
            self.steps_per_execution,
            x,
            y,
            batch_size,
            validation_split,
            validation_data,
            kwargs,
        )
        kwargs.pop("repeated_rows", None)  # (Keras's fit does not take it)
        # Several processes draw one step from their copies of the data (hosts.py).
        hosts.check_same_examples(x, y)
        # Before the checks that look for copies of them (data_copies.py).
        training_rows.register(x, from_source=y is None)
        held_out.refuse_training_rows(given_validation)
        provenance.check(self, getattr(self, "loss", None))
        epochs = _validate.positive_int("epochs", epochs)
        _, _, devices = jax_step.data_parallel()
        pool = None
        if y is None:  # a random-access source (`example_source`)
            if example_source.loads_in_parallel(x):
                # Every core of the host decodes and augments a step's examples.
                pool = concurrent.futures.ThreadPoolExecutor(len(os.sched_getaffinity(0)))
            rows_of, num_rows = example_source.source_rows(x, pool), len(x)
            one_example = tree.map_structure(lambda a: a[None], example_source.first_example(x))
        else:
            rows_of, num_rows = example_source.array_rows(x, y), len(tree.flatten(x)[0])
            one_example = tree.map_structure(lambda a: a[:1], (x, y))
        one_x, one_y = one_example
        one_view = tree.map_structure(lambda a: a[:, 0], one_x) if config.augmult > 1 else one_x
        self._symbolic_build(data_batch=(one_view, one_y))
        # What one example's loss runs and holds (callbacks into Python,
        # copies of training data, a loss writing state), before any update.
        traced_loss.check(self, tree.map_structure(lambda a: a[0], one_example))
        # Weights set as arrays since construction bring what they went
        # through; the values this fit leaves are remembered (a copy too).
        before = ledger_lib.recall(self, self.privacy_ledger)
        callbacks = step_count.fit_callbacks(self, kwargs.pop("callbacks", None), before)
        start, history = int(self.dp_steps), step_count.history_of(callbacks)
        if step_count.cap_reached_before_training(self, callbacks, kwargs.get("verbose", "auto")):
            history.set_model(self)
            return history
        steps = poisson_steps.poisson_steps(
            rows_of,
            num_rows,
            config.sampling_rate,
            config.expected_batch_size,
            row_multiple=self._examples_per_chunk * devices,
            may_draw=lambda drawn: self.step_limit is None or start + drawn < self.step_limit,
            first_step=start,
            # The same in every process of a multi-host run (hosts.py).
            secret=hosts.shared_secret(),
            process=hosts.share(),
        )
        try:
            with hosts.steps_fed_per_process():
                return super().fit(
                    steps,
                    epochs=epochs,
                    steps_per_epoch=_steps_per_epoch(config),
                    validation_data=validation_data,
                    callbacks=callbacks,
                    shuffle=False,
                    **kwargs,
                )
        except step_count.CapReached:
            return history
        finally:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
            self.set_step_limit(None)
            # (Values left detached by a fit that failed before its first
            # step trained nothing.)
            if _keras_internals.values_attached(self.weights):
                ledger_lib.remember(self.weights, self.privacy_ledger, unless=before)

    def train_on_batch(self, *args, **kwargs):
        """Refused: a single batch is not a Poisson step; use `fit`."""
        raise ValueError(
            "train_on_batch is refused: a batch the caller chose is not a Poisson step. Train "
            "with fit(x, y, epochs=...), which draws its steps itself."
        )


def _steps_per_epoch(config: DPConfig) -> int:
    """round(N / B): the logical steps of one epoch of `fit`."""
    return max(1, int(math.floor(config.dataset_size / config.expected_batch_size + 0.5)))
