"""The compiled train step of a `DPKerasModel`, up to its noisy update; the test step.

One micro-batch: unpacked and checked (labels, ids, the Poisson identity),
per-example gradients clipped and summed, added to the logical step's sums,
and the training logs (`release_train_metrics`). The update itself is
`noisy_update.py`'s.
"""

from typing import NamedTuple

import keras
import tensorflow as tf

from tan_keras import _keras_internals, _validate
from tan_keras.keras_dp import (
    callback_checks,
    example_weights,
    fit_inputs,
    labels,
    row_prefix,
    step_identity,
)
from tan_keras.mechanism import (
    chunking,
    content_digest,
    data_copies,
    layerwise,
    model_analysis,
    per_example,
    provenance,
    sampling,
)

# What the train step returns when it releases nothing (release_train_metrics
# =False without a noisy clipped fraction): Keras's train function cannot
# return an empty structure (its tf.experimental.Optional needs a tensor).
# A constant, so it carries nothing; `make_train_function` removes it.
_NOTHING_RELEASED = "dp_nothing_released"


def _logs_for_strategy(logs):
    """The step's logs in the shape Keras can reduce across workers.

    Keras 3 averages each log over replicas with `strategy.reduce("MEAN", v,
    axis=0)` under a multi-worker strategy, which fails on a scalar; a
    one-element vector reduces to the same scalar.
    """
    if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
        return {name: tf.reshape(value, [1]) for name, value in logs.items()}
    return logs


class _StepStatistics(NamedTuple):
    """What the package's trackers take from one micro-batch (release_train_metrics)."""

    losses: tf.Tensor
    clipped_fraction: tf.Tensor
    num_examples: tf.Tensor
    norms: tf.Tensor
    num_nonfinite: tf.Tensor


class _TrainStep:
    """One micro-batch of DP-SGD up to its noisy update; the test step."""

    def _unpack(self, data):
        """(x, y, mask, step_end, sample_weight, identity): mask marks the real rows."""
        step_end, sample_weight, identity = None, None, None
        kind = fit_inputs.check_element(self._dp_config, data)
        if kind == fit_inputs.POISSON:
            # The identity is checked against the ledger in train_step; the
            # content it vouches for must be what its seal can read.
            step_identity.refuse_unsealable(tuple(data[:3]))
            x, y, mask, step_end, identity = data
        elif kind == fit_inputs.MICRO_BATCHES:
            x, y, mask, step_end = data
        else:
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            mask = None
            if tf.nest.is_nested(sample_weight):
                # Before the mask: a structure has no one weight per row.
                raise ValueError(
                    "Invalid value for `sample_weight`: expected one weight per example (a "
                    "vector): it weighs the example's whole loss, all outputs together. "
                    "Received: a structure of weights. Put per-output weights into "
                    "loss_weights, or into the loss functions."
                )
            if sample_weight is not None:
                # A weight of 0 leaves the example out, as in Keras.
                mask = tf.cast(tf.reshape(sample_weight, [-1]) > 0, tf.float32)
        if y is None:
            raise ValueError("DPKerasModel.fit needs labels: batches must be (x, y, ...).")
        y = self._labels_per_output(y)
        if mask is None:
            mask = tf.ones(tf.shape(per_example.first_leaf(y))[:1], tf.float32)
        return x, y, mask, step_end, sample_weight, identity

    def _labels_per_output(self, y):
        """`y` as one tensor per output (a list for several outputs)."""
        y = self._output_losses.flat_labels(y)
        if not self._output_losses.several:
            return y
        present = [t for t in y if t is not None]
        rows = tf.shape(present[0])[:1]
        # An output without loss needs no labels: a placeholder keeps the
        # structure (nothing compares it with a prediction).
        return [tf.zeros(rows, tf.float32) if t is None else t for t in y]

    def train_step(self, data):
        """One micro-batch of DP-SGD (docs/tan-method.md, section 1).

        The algorithm's stages, in order: the per-example gradients of the
        micro-batch's examples (their K views averaged), clipped and summed;
        the sum accumulated over the micro-batches of the logical step; at
        the step's end and within the step cap, one noisy update (noise once,
        divided by the expected batch size, EMA and ledger); the metrics of
        the examples that contributed.
        """
        x, y, mask, step_end, sample_weight, identity = self._unpack(data)
        weights = example_weights.example_weights(sample_weight)
        y, mask, num_invalid = self._drop_invalid_labels(y, mask)
        model, x, mask, num_bad_ids = self._per_example_inputs(x, mask)
        self._refuse_loss_state(y, self._symbolic_outputs())
        clipped, losses, y_pred = self._clipped_sum(model, x, y, mask, weights)
        self._refuse_loss_state(y, y_pred)
        self._accumulate(clipped)
        step_end = self._ends_logical_step(step_end)
        release = self._releases_update(step_end)
        if identity is not None:
            # On the element as it arrived: (x, y, mask) as the pipeline sealed them.
            content_ok = content_digest.matches(
                tuple(data[:3]), identity, self._pinned_nonce(identity)
            )
            release = tf.logical_and(release, self._identity_holds(identity, step_end, content_ok))
        self._noisy_update(self._accumulated(), release)
        self._close_logical_step(step_end)
        return self._training_logs(
            clipped, losses, y, y_pred, num_invalid + num_bad_ids, weights=weights
        )

    def _symbolic_outputs(self):
        # The outputs' structure of a model with known outputs; else None
        # (a subclassed model: its predictions are known after the pass).
        if not getattr(self, "outputs", None):
            return None
        return _keras_internals.outputs_structure(self)

    def _refuse_loss_state(self, y, y_pred):
        """Refuses a loss that keeps state between examples, when the step is traced.

        The loss runs once per example (or per view): a variable it writes (a
        running mean, a counter of hard examples), or Python state behind a
        `tf.py_function`, carries each example's data
        into the losses, and so the clipped gradients, of every later one:
        one example could move many updates. Checked here, where the labels'
        and predictions' specs are known for every kind of model, before the
        traced step can run once.

        Raises:
          ValueError: naming the `loss` and the variable it writes (or its
            call into Python).
        """
        if self._loss_keeps_no_state or y_pred is None:
            return

        def spec(t):
            return None if t is None else tf.TensorSpec(t.shape, t.dtype)

        specs = (tf.nest.map_structure(spec, y), tf.nest.map_structure(spec, y_pred))
        written = model_analysis.function_writes(self._per_example_loss, *specs, autograph=True)
        # A loss holding training rows or adapted statistics (a closure).
        with tf.init_scope():  # read eagerly, out of the train step's trace
            provenance.discover_adapted()
        data_copies.check_function(self._per_example_loss, *specs, where="The loss")
        if written:
            raise _validate.invalid(
                "loss",
                "a loss that keeps no state between examples",
                f"one that {written[0]}",
                "Evaluated one example at a time, it would carry each example's data into "
                "the clipped gradients of every later one. Compute what it keeps beforehand "
                "(from public data) and pass it as a constant.",
            )
        self._loss_keeps_no_state = True

    def _pinned_nonce(self, identity):
        """The nonce the element's seal is checked with (`SecretState.pinned_nonce`).

        The pinned pipeline's for a micro-batch of a pipeline's stream (a
        twin's seal, another nonce, does not match); 0 for identities built
        by hand with the package-internal seal (tests), which carry no mark.
        """
        source = tf.cast(identity[0, 5], tf.int64)
        return tf.where(
            sampling.is_pipeline_stream(source),
            tf.cast(self._secret.pinned_nonce, tf.int64),
            tf.constant(0, tf.int64),
        )

    def _identity_holds(self, identity, step_end, content_ok):
        """Checks the micro-batch's identity against the ledger (step_identity.py).

        Records the first violation (every replica agrees on it) and returns
        whether no violation happened in this fit: after one, nothing is
        released until the next fit.
        """
        secret, config = self._secret, self._dp_config
        limit = secret.step_limit
        capped = tf.logical_and(limit >= 0, self.dp_steps >= limit)
        replica = tf.distribute.get_replica_context()
        code = step_identity.check(
            identity,
            step_end,
            secret.position,
            secret.pending,
            secret.step_source,
            config.dataset_size,
            config.expected_batch_size,
            replica_id=replica.replica_id_in_sync_group,
            num_replicas=replica.num_replicas_in_sync,
            content_ok=content_ok,
            pinned=secret.stream_pinned,
            pinned_source=secret.pinned_source,
        )
        # Past the step cap nothing is released, so nothing needs to match.
        code = tf.where(capped, tf.constant(step_identity.OK, tf.int64), code)
        if replica.num_replicas_in_sync > 1:
            # Replicas hold different rows of one micro-batch; if they
            # disagree, its rows were mixed.
            bad = tf.cast(tf.not_equal(code, step_identity.OK), tf.int64)
            anywhere = replica.all_reduce(tf.distribute.ReduceOp.SUM, bad) > 0
            code = tf.where(
                tf.logical_and(anywhere, tf.equal(code, step_identity.OK)),
                tf.constant(step_identity.MIXED_ROWS, tf.int64),
                code,
            )
        tag = tf.cast(identity[0], tf.int64)
        record = tf.stack(
            [code, tag[0], tag[1], tf.cast(secret.position, tf.int64), secret.pending]
        )
        first = tf.logical_and(
            tf.equal(secret.violation[0], step_identity.OK),
            tf.not_equal(code, step_identity.OK),
        )
        secret.violation.assign(tf.where(first, record, secret.violation))
        secret.step_source.assign(tf.where(tf.equal(secret.pending, 0), tag[5], secret.step_source))
        return tf.equal(secret.violation[0], step_identity.OK)

    def _drop_invalid_labels(self, y, mask):
        """Drops the examples with a class label out of range in any output (labels.py)."""
        classes = self._output_losses.sparse_classes
        if not self._output_losses.several:
            if classes[0] is None:
                return y, mask, 0.0
            return labels.drop_invalid(y, mask, classes[0])
        real = mask
        y = list(y)
        for index, count in enumerate(classes):
            if count is not None:
                y[index], mask, _ = labels.drop_invalid(y[index], mask, count)
        dropped = tf.logical_and(tf.cast(real, tf.float32) > 0, tf.cast(mask, tf.float32) <= 0)
        return y, mask, tf.reduce_sum(tf.cast(dropped, tf.float32))

    def _per_example_inputs(self, x, mask):
        """(model, views, mask, num_bad_ids): what the per-example routes run, on what.

        The inputs as [batch, K, ...] views; string preprocessing and random
        augmentation run once on the micro-batch (row_prefix.py) and the
        routes run the rest of the model; examples with an invalid id are
        dropped (id_inputs.py).
        """
        ranks = per_example.input_ranks(_keras_internals.inputs_structure(self), x)
        x = per_example.as_views(x, self._dp_config.augmult, ranks)
        model = self
        if self._row_prefix is not None:
            x = self._row_prefix.suffix_views(self, x)
            model = self._row_prefix.suffix
        if self._id_check is None:
            return model, x, mask, 0.0
        by_input = row_prefix.leaves_by_input(model, x)
        x, mask, num_bad_ids = self._id_check.drop_invalid(x, by_input, mask)
        return model, x, mask, num_bad_ids

    def _clipped_sum(self, model, x, y, mask, weights):
        """Per-example gradients of the micro-batch (losses weighted), clipped to C, summed."""
        ghost_layers = self._ghost_layers

        def compute(views, labels, loss_weights=None):
            if self._clipping == "layerwise":
                return layerwise.per_example_gradients(
                    model, self._per_example_loss, views, labels, example_weights=loss_weights
                )
            return per_example.per_example_gradients(
                model,
                self._per_example_loss,
                views,
                labels,
                ghost_layers=ghost_layers,
                example_weights=loss_weights,
                one_at_a_time=self._one_at_a_time,
            )

        variables = model.trainable_variables
        # "auto" sizes chunks by all the variables, ghost kernels included,
        # although those form no per-example gradients: the chunk also bounds
        # the vectorized pass's activations, and budgeting only the formed
        # gradients let WRN-16-4 run unchunked at 1.49x the plain step's
        # peak memory, against 1.03x in chunks of 16, at the same speed.
        clipped, losses, predictions = chunking.clip_in_chunks(
            compute,
            variables,
            x,
            y,
            mask,
            self._dp_config.l2_norm_clip,
            chunking.chunk_size(
                per_example.first_leaf(x).shape[0], variables, self._examples_per_chunk
            ),
            example_weights=weights,
            num_outputs=len(self.outputs),
        )
        if model is not self:
            # The cut model lists the same variables, maybe in another order.
            summed = {id(v): g for v, g in zip(variables, clipped.grad_sum)}
            clipped = clipped._replace(grad_sum=[summed[id(v)] for v in self.trainable_variables])
        return clipped, losses, predictions

    def _training_logs(self, clipped, losses, y, y_pred, num_invalid, weights=None):
        if not self._release_train_metrics:
            # Nothing computed without noise on the training examples leaves
            # the step: only the noisy clipped fraction, if released.
            noisy = self._trackers.noisy_clipped
            if noisy is None:
                return _logs_for_strategy({_NOTHING_RELEASED: tf.zeros([])})
            return _logs_for_strategy({noisy.name: noisy.result()})
        # Metrics describe the examples that contributed: padding and zeroed
        # (non-finite) examples are left out, and selected away rather than
        # weighted by 0, since 0 * NaN = NaN would still poison the averages
        # (and trip TerminateOnNaN, EarlyStopping...).
        kept = clipped.kept
        weight = tf.cast(kept, tf.float32)
        n_real = tf.maximum(clipped.num_examples, 1.0)
        # Examples dropped for an invalid label count with the non-finite ones
        # (see labels.py): either way their loss has no value.
        statistics = _StepStatistics(
            tf.where(kept, losses, tf.zeros_like(losses)),
            clipped.num_clipped / n_real,
            clipped.num_examples,
            clipped.norms,
            clipped.num_nonfinite + num_invalid,
        )

        def kept_only(prediction):
            kept_rows = tf.reshape(kept, [-1] + [1] * (prediction.shape.rank - 1))
            return tf.where(kept_rows, prediction, tf.zeros_like(prediction))

        y_pred = tf.nest.map_structure(kept_only, y_pred)
        y = self._output_losses.predictions_like_labels(y, y_pred)
        weighted = weight if weights is None else weight * tf.cast(weights, tf.float32)
        arguments = (statistics, y, y_pred, weight, weighted)
        # Before the update is traced into the step, so that nothing of it runs.
        self._refuse_metric_writes(arguments)
        logs = self._update_metrics(*arguments)
        # Traced, not run: the keys are known before any update.
        callback_checks.check_step_logs(logs)
        return _logs_for_strategy(logs)

    def _update_metrics(self, statistics, y, y_pred, weight, weighted):
        """Updates the trackers and the compiled (or own) metrics; returns the logs.

        Args:
          statistics: The micro-batch's `_StepStatistics`.
          y: Labels, shaped like the predictions.
          y_pred: Predictions, zero on the rows that did not contribute.
          weight: [batch] 1 on the rows that contributed, else 0.
          weighted: `weight` times the examples' own weights.

        Returns:
          The logs of the step.
        """
        trackers = self._trackers
        trackers.loss.update_state(statistics.losses, sample_weight=weight)
        trackers.clipped.update_state(
            statistics.clipped_fraction, sample_weight=statistics.num_examples
        )
        trackers.norm.update_state(statistics.norms, sample_weight=weight)
        trackers.nonfinite.update_state(statistics.num_nonfinite)
        if type(self).compute_metrics is not keras.Model.compute_metrics:
            # A compute_metrics of one's own decides what the weight means.
            return self.compute_metrics(None, y, y_pred, weight)
        # Keras updates `metrics` without sample weights (only
        # `weighted_metrics` take them): the padding rows would count as
        # examples. Every compiled metric is masked to the kept rows; the
        # weighted ones also take the examples' weights, as in Keras.
        _keras_internals.update_compiled_metrics(self, y, y_pred, weight, weighted)
        return self.get_metrics_result()

    def _refuse_metric_writes(self, arguments):
        """Refuses a metrics update that writes anything but the metrics' own variables.

        The metrics see the whole micro-batch's predictions, without clipping
        or noise. Their results are released (release_train_metrics), but a
        variable they write that training reads (a weight a layer reads, a
        compute_metrics of one's own keeping a statistic of the predictions
        in it, a metric's update_state writing a model variable) carries that
        statistic into every later update. So the update (trackers, compiled
        metrics, a compute_metrics of one's own) may write only the variables
        of metrics, and only those that the step traced so far (the forward
        pass, the loss, the noisy update) did not capture. Checked when the
        step is traced, before it can run once. Calls into Python are left
        to it: nothing that trains may call Python (model, loss, augmenter
        and constraints are refused if they do), so what it keeps there
        reaches no update.

        Args:
          arguments: The arguments of `_update_metrics`.

        Raises:
          ValueError: naming the variable written.
        """
        earlier = frozenset()
        if not tf.executing_eagerly():
            # What the step traced so far captured: read by training.
            earlier = model_analysis.captured_handles(tf.compat.v1.get_default_graph())
        # (Run eagerly, with run_eagerly=True, there is no step graph to read:
        # only writes to variables outside every metric are refused then, and
        # after the step's noisy update, before the metrics are updated.)

        def metric_variables():
            # Called after the trace: a metric built on its first update counts.
            metrics = list(self.metrics) + list(keras.Model.metrics.fget(self))
            return [
                variable
                for metric in metrics
                for variable in metric.variables
                if not earlier or model_analysis.local_handle_id(variable) not in earlier
            ]

        def spec(t):
            return tf.TensorSpec(t.shape, t.dtype)

        specs = tf.nest.map_structure(spec, arguments)
        written = model_analysis.function_writes(
            self._update_metrics,
            *specs,
            autograph=True,
            allowed=metric_variables,
            python=False,
            seed_states=False,
        )
        if written:
            own = type(self).compute_metrics is not keras.Model.compute_metrics
            name = "compute_metrics" if own else "metrics"
            raise _validate.invalid(
                name,
                "a metrics update that writes only the variables of its metrics",
                f"one that {written[0]}",
                "The train step updates the metrics with the whole micro-batch's "
                "predictions, without clipping or noise: a variable they write that "
                "training reads (a weight, a variable read by a layer or the loss) carries "
                "them into every later update. Keep what a metric accumulates in its own "
                "variables (Metric.add_variable), read by nothing but the metric",
            )

    @property
    def metrics(self):
        compiled = _keras_internals.compiled_metrics(self)
        if not self._release_train_metrics:
            # The train step never updates them; the test step builds them
            # on held-out data. Unbuilt, their result() would raise where
            # Keras reads every metric at an epoch's end.
            compiled = [metric for metric in compiled if metric.built]
        return self._trackers.leading() + compiled + self._trackers.trailing()

    # --------------------------------------------------------------- test step
    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred = self(x, training=False)
        y = self._labels_per_output(y)
        losses = self._per_example_loss(y, y_pred)
        self._trackers.eval_loss.update_state(losses, sample_weight=sample_weight)
        y = self._output_losses.predictions_like_labels(y, y_pred)
        # Unchecked, unlike the train step's metrics (`_refuse_metric_writes`):
        # held-out data, no training example (held_out.py refuses those).
        self.compute_metrics(x, y, y_pred, sample_weight)
        logs = {"loss": self._trackers.eval_loss.result()}
        for metric in _keras_internals.compiled_metrics(self):
            result = metric.result()
            logs.update(result if isinstance(result, dict) else {metric.name: result})
        return _logs_for_strategy(logs)
