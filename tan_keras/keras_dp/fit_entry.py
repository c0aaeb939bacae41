"""`fit` and the Keras entry points around it, guarded against what would void DP.

The `DPKerasModel` mixin of `fit` (its inputs, callbacks and Poisson sampler
checked and prepared), `evaluate`, `save`/`load_weights` (no legacy HDF5),
the train function (errors from inside the step scrubbed of private values,
the identity check's verdict raised) and the refused `train_on_batch`; with
the checks that construction, `compile` and every `fit` run on the model.
"""

import inspect
import os
import re

import keras
import tensorflow as tf

from tan_keras import _keras_internals, _repeated_rows
from tan_keras.keras_dp import (
    array_inputs,
    class_weights,
    debug_dumps,
    dp_state,
    example_weights,
    fit_inputs,
    model_checks,
    step_identity,
    step_stderr,
)
from tan_keras.keras_dp import ledger as ledger_lib
from tan_keras.keras_dp.callbacks import PrivacyAccountant
from tan_keras.keras_dp.train_step import _NOTHING_RELEASED
from tan_keras.mechanism import (
    data_copies,
    held_out,
    layerwise,
    model_analysis,
    provenance,
    sampling,
)


def _label_spec(arguments):
    """Shape and dtype of a batch of labels in fit's/evaluate's data, or None.

    For several outputs, the same structure of specs as the labels.
    """
    data = arguments.get("x")
    if isinstance(data, (tf.data.Dataset, tf.distribute.DistributedDataset)):
        spec = data.element_spec
        if isinstance(spec, tuple) and len(spec) >= 2:
            leaves = tf.nest.flatten(spec[1])
            if leaves and all(hasattr(leaf, "shape") for leaf in leaves):
                return spec[1]
        return None
    labels = arguments.get("y")
    leaves = tf.nest.flatten(labels) if labels is not None else []
    if not leaves or not all(hasattr(t, "shape") and hasattr(t, "dtype") for t in leaves):
        return None
    return tf.nest.map_structure(
        lambda t: tf.TensorSpec(tuple(t.shape), tf.as_dtype(t.dtype)), labels
    )


# The forms in which TensorFlow 2.21's kernels print a value they found in the
# data (and the row it sits in) when it is out of range: an id read by a
# custom layer, a label read by a custom loss, a weight checked by an
# assertion. Each names a private value or where it sits in the batch; the
# line holding one is kept with its numbers and quoted strings replaced.
_PRIVATE_VALUE_FORMS = (
    # GatherV2, ResourceGather, ResourceScatter*, DynamicPartition:
    # "indices[1,0,2] = 4242 is not in [0, 10)".
    r"= -?\d+ is not in \[",
    # UnsortedSegment*, also as the gradient of a gather or take_along_axis
    # (a flat offset of value and row): "segment_ids[3,0] = 4251 is out of range [0, 48)".
    r"= -?\d+ is out of range \[",
    # SparseSegment*: "Bad: indices[2] == 4242 out of range [0, 3)".
    r"== -?\d+ out of range \[",
    # GatherNd, ScatterNd, TensorScatter*: "indices[2] = [4242] does not index into ...".
    r"= \[[-\d, ]*\] does not index into",
    # SparseToDense: "indices[1] = [4242] is out of bounds: need 0 <= index < [3]".
    r"= \[[-\d, ]*\] is out of bounds",
    # SparseSoftmaxCrossEntropyWithLogits: "Received a label value of 4242 which
    # is outside the valid range of [0, 3).  Label values: 0 1 4242" (every label).
    r"label value of -?\d+",
    # StridedSlice and Slice at a position computed from the data.
    r"slice index -?\d+ of dimension",
    r"Expected begin\[\d+\] in \[",
    # tf.debugging.assert_* (the sample_weight check among them) prints the
    # first values of the checked tensor: "Condition x >= 0 did not hold
    # element-wise:] [x (w:0) = ] [1 2 -4242]" (only the condition is kept).
    r"did not hold",
)
_OUT_OF_RANGE_VALUE = re.compile("|".join(f"(?:{form})" for form in _PRIVATE_VALUE_FORMS))
_CONDITION = re.compile(r"Condition [\w <>=!.]{1,40}? did not hold(?: element-wise)?")
# TensorFlow's fixed sentences about shapes, dtypes and numerics, matched in
# full: their only variable parts are numbers (replaced, a shape can be
# computed from the data: a boolean_mask's, a unique's) and graph names.
_STRUCTURAL_FORMS = tuple(
    re.compile(form)
    for form in (
        r"Incompatible shapes: \[[\d,]*\] vs\. \[[\d,]*\]",
        r"Matrix size-incompatible: In\[0\]: \[[\d,]*\], In\[1\]: \[[\d,]*\]",
        r"Shape of tensor [\w/:.-]+ \[[\d,?]*\] is not compatible with expected shape "
        r"\[[\d,?]*\]",
        r"Input to reshape is a tensor with \d+ values, but the requested shape "
        r"(?:has|requires a multiple of) \d+",
        r"ConcatOp : Dimension \d+ in both shapes must be equal: shape\[\d+\] = \[[\d,]*\] "
        r"vs\. shape\[\d+\] = \[[\d,]*\]",
        r"cannot compute \w+ as input #\d+\(zero-based\) was expected to be a \w+ tensor "
        r"but is a \w+ tensor",
        r"Tensor had (?:NaN|[+-]?Inf)(?: and (?:NaN|[+-]?Inf))? values",
        r"OOM when allocating tensor with shape\[[\d,]*\]",
    )
)
# The package's own messages from inside the step (their values withheld).
_OWN_MESSAGES = (
    example_weights.NEGATIVE_WEIGHT,
    # tan_keras.training.train_data's refusal of an undecodable image.
    "could not be decoded as an image (corrupt, truncated, or not a JPEG, PNG, GIF or BMP): "
    "re-encode it, or leave it out of the dataset (and out of N).",
)
# Where TensorFlow names the failing op: "[[{{node loop_body/GatherV2}}]]".
_FAILED_NODE = re.compile(r"\{\{node ([^}]+)\}\}")
# A frame of the op's "defined at (most recent call last):" trace (code, not data).
_FRAME = re.compile(r'^\s*File "([^"\n]+)", line (\d+), in ([\w<>.]+)\s*$')
# A line of TensorFlow's C++ log: "W0000 00:00:1796.04 26814 local_rendezvous.cc:412] ...".
_LOG_LINE = re.compile(
    r"^((?:[IWEF]\d{4} [\d:.]+\s+\d+ |\d{4}-\d\d-\d\d [\d:.]+: [IWEF] )[\w/.-]+:\d+\] ?)(.*)$"
)
# A status code in a log line: "... aborting with status: INVALID_ARGUMENT: ...".
_STATUS = re.compile(r"\b[A-Z][A-Z_]{3,}: ")
_HOW_TO_SEE = (
    "TensorFlow's message of a failing op can print values computed from the data (an "
    "assertion's tensors, a py_function's exception, a custom op's text), so during a "
    "private fit it is kept only where its form is known to hold none. To see all of it, "
    "run the same model with plain Keras (without make_private) on public or synthetic data "
    "that fails the same way."
)


def _withheld(text: str) -> str:
    """`text` with its numbers and quoted strings replaced."""
    return re.sub(r"\d+", "#", re.sub(r"(['\"]).*?\1", "'...'", text))


def _kept_sentence(message: str):
    """What of a failing op's message holds no value of the data, and its kind.

    The package's own message, a known out-of-range form (its line, numbers
    and quoted strings replaced; an assertion's condition only) or a
    structural form (numbers replaced); else (None, None): withheld whole.
    """
    for own in _OWN_MESSAGES:
        if own in message:
            return own, "own"
    for line in message.splitlines():
        if _OUT_OF_RANGE_VALUE.search(line):
            condition = _CONDITION.search(line)
            if condition:
                return _withheld(condition.group(0)), "assertion"
            if "did not hold" in line:
                return "an assertion's condition did not hold", "assertion"
            return _withheld(line.strip()), "index"
    for form in _STRUCTURAL_FORMS:
        found = form.search(message)
        if found:
            # (Digits after a lowercase letter are a dtype's: float32.)
            return re.sub(r"(?<![a-z])\d+", "#", found.group(0)), "structure"
    return None, None


def _defined_at(message: str) -> str:
    """' The op was defined at File "...", line N, in f.', or ''.

    The innermost frame of the op's trace outside Keras, TensorFlow and the
    package (the user's layer or loss) where there is one, else the innermost.
    """
    _, marker, rest = message.partition("defined at (most recent call last):")
    frames = []
    for line in rest.splitlines() if marker else ():
        if not line.strip():
            continue
        frame = _FRAME.match(line)
        if not frame:
            break
        frames.append(frame.groups())
    if not frames:
        return ""
    libraries = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    libraries += [os.path.dirname(os.path.abspath(m.__file__)) for m in (keras, tf)]
    own = [f for f in frames if not any(f[0].startswith(lib + os.sep) for lib in libraries)]
    path, line, function = (own or frames)[-1]
    return f' The op was defined at File "{path}", line {line}, in {function}.'


def _failure_text(kind: str, message: str) -> str:
    """The text of a scrubbed error: what failed, where, and how to see the rest."""
    sentence, form = _kept_sentence(message)
    node = _FAILED_NODE.search(message)
    where = f" (op `{_withheld(node.group(1))}`)" if node else ""
    hint = (
        "An id or label out of range of a table is the usual cause: Embedding and lookup "
        "layers drop such examples, a custom layer or loss reading a table must check its "
        "ids itself. "
        if form == "index"
        else ""
    )
    return (
        f"A training step failed inside TensorFlow ({kind}): "
        f"{sentence or 'the message of the failing op'}{where} "
        "[values and positions withheld: they come from private training examples]."
        f"{_defined_at(message)} {hint}{_HOW_TO_SEE}"
    )


def scrubbed_error(error: "tf.errors.OpError") -> Exception:
    """`error` from inside a train step, its values withheld.

    A runtime error of the compiled step is raised by the data of one
    micro-batch, and its message can print what the failing op found there:
    an out-of-range id read by a custom layer ("indices[1,0,2] = 4242 is not
    in [0, 10)"), a label read by a custom loss, the tensors a
    `tf.debugging.Assert` checked ("assertion failed: [[1234.5 ...]]", found by
    a review), a py_function's exception, a custom op's text. Withheld by
    default: only the error type, the failing op (its name and where it was
    defined), the package's own messages and the forms known to hold no
    value (`_kept_sentence`, their numbers replaced) are kept.

    Args:
      error: The error raised by the compiled train function.

    Returns:
      An error of the same type whose message holds nothing of the data.
    """
    message = str(getattr(error, "message", None) or "")
    text = _failure_text(type(error).__name__, message)
    try:
        return type(error)(None, None, text)
    except TypeError:
        return tf.errors.UnknownError(None, None, text)


def _raised_by_package(error: BaseException) -> bool:
    """Whether `error` was raised by the package's own code (its messages are its own)."""
    traceback = error.__traceback__
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    if traceback is None:
        return False
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.abspath(traceback.tb_frame.f_code.co_filename).startswith(package + os.sep)


def _scrubbed_python_error(error: Exception) -> Exception:
    """A Python error of a step run eagerly, whose message may print the data."""
    traceback = error.__traceback__
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    raised_at = (
        f' It was raised at File "{traceback.tb_frame.f_code.co_filename}", line '
        f"{traceback.tb_lineno}, in {traceback.tb_frame.f_code.co_name}."
        if traceback is not None
        else ""
    )
    text = (
        f"A training step run eagerly (run_eagerly=True) failed ({type(error).__name__}) "
        "[message withheld: code run eagerly sees the values of private training examples, "
        f"and its message may print them].{raised_at} {_HOW_TO_SEE}"
    )
    try:
        scrubbed = type(error)(text)
    except Exception:
        return RuntimeError(text)
    return scrubbed if str(scrubbed) == text else RuntimeError(text)


def _scrubbed_log(text: str) -> str:
    """TensorFlow's C++ log written during a step, what may hold the data withheld.

    A log line reporting a status ("Local rendezvous is aborting with status:
    INVALID_ARGUMENT: assertion failed: [[1234.5 ...]]"), or any warning or
    error, keeps its prefix and what `_kept_sentence` keeps; the lines
    continuing it (a multi-row tensor, a py_function's traceback) are
    withheld. Other lines are kept, those holding a known out-of-range form
    with their numbers replaced.
    """
    out, in_record = [], False
    for line in text.splitlines(keepends=True):
        logged = _LOG_LINE.match(line.rstrip("\r\n"))
        if logged:
            prefix, body = logged.groups()
            in_record = prefix[0] in "WEF" or " W " in prefix or " E " in prefix
            in_record = in_record or bool(_STATUS.search(body)) or "status" in body
            if not in_record:
                out.append(line)
                continue
            sentence, _ = _kept_sentence(body)
            status = _STATUS.search(body)
            code = f"{status.group(0)}" if status else ""
            out.append(
                f"{prefix}{code}{sentence or 'message'} [values withheld during a private "
                "training step: they come from private training examples]\n"
            )
        elif in_record:
            continue
        else:
            out.append(_withheld(line) if _OUT_OF_RANGE_VALUE.search(line) else line)
    return "".join(out)


class _FitEntry:
    """`fit` and the Keras entry points around it, guarded against what would void DP."""

    # --------------------------------------------------------------------- fit
    def fit(self, *args, **kwargs):
        """`keras.Model.fit`, guarded against inputs that would void DP.

        In-memory data (`fit(x, y, batch_size=B, epochs=E,
        validation_split=...)`, arrays or dicts/lists of them) is
        Poisson-sampled by the model itself (`array_inputs.py`): about N / B
        noisy updates per epoch. A `tf.data` pipeline must come from
        `tan_keras.make_poisson_dataset` (endless by default: pass
        `steps_per_epoch`, counted in micro-batches).
        `sample_weight` weighs each example's loss before its gradient is
        clipped (`example_weights.py`): clipping still bounds every
        example's contribution by C; a weight of 0 leaves the example out, a
        negative one is refused. `class_weight` is refused (a table the model
        cannot tell from one computed from the training labels' counts).
        `repeated_rows`: "refuse" (the default: arrays holding an example
        twice are refused before any work, `tan_keras/_repeated_rows.py`) or
        "distinct_people".

        Raises:
          ValueError: for a finite dataset of unknown length with several
            epochs (Keras would cut logical steps at epoch boundaries), a
            `class_weight`, a model that was not compiled, a preprocessing
            layer adapted on data since the model was built (`provenance.py`),
            or a compiled metric named like a held-out or noise-covered log
            (`callback_checks.py`).
        """
        # Ours, not Keras's: whether equal training rows are distinct people.
        repeated_rows = kwargs.pop("repeated_rows", None)
        bound = inspect.signature(keras.Model.fit).bind(self, *args, **kwargs)
        arguments = {**bound.arguments, **bound.arguments.get("kwargs", {})}
        arguments.pop("self", None)
        arguments.pop("kwargs", None)
        # Before any work: a table computed from the label counts (class_weights.py).
        class_weights.refuse_class_weight(arguments.pop("class_weight", None))
        class_weights.refuse_label_table(arguments.get("sample_weight"), arguments.get("y"))
        if not fit_inputs.is_array(arguments.get("x")):
            _repeated_rows.refuse_for_input(
                repeated_rows,
                type(arguments.get("x")).__name__,
                "A pipeline's rows are checked where it is made: "
                "make_poisson_dataset(..., repeated_rows=...).",
            )
        if repeated_rows is None:
            repeated_rows = _repeated_rows.REFUSE
        if self._dp_config.sampling == "shuffled" and fit_inputs.is_array(arguments.get("x")):
            _repeated_rows.check(arguments["x"], arguments.get("y"), repeated_rows)
        if fit_inputs.is_array(arguments.get("x")):
            # Before the checks that look for copies of them (data_copies.py).
            data_copies.register_rows(arguments["x"])
        held_out.refuse_training_rows(arguments.get("validation_data"))
        provenance.check(self, getattr(self, "loss", None))
        self._check_held_values()
        self._check_layerwise_still_supported()
        if self._dp_config.sampling == "poisson" and fit_inputs.is_array(arguments.get("x")):
            # The model draws the Poisson batches of in-memory data itself.
            arguments = array_inputs.poisson_arguments(self._dp_config, arguments, repeated_rows)
        # Before `prepare` wraps it: what was applied to the Poisson pipeline.
        sampler = self._poisson_sampler(arguments.get("x"))
        arguments = fit_inputs.prepare(self._dp_config, arguments)
        data = arguments.get("x")
        epochs = arguments.get("epochs", 1) - arguments.get("initial_epoch", 0)
        if (
            isinstance(data, tf.data.Dataset)
            and arguments.get("steps_per_epoch") is None
            and epochs > 1
            and data.cardinality() == tf.data.UNKNOWN_CARDINALITY
        ):
            raise ValueError(
                "Invalid value for `steps_per_epoch`: expected an integer when fitting "
                "several epochs on a dataset of unknown length (a Poisson pipeline: "
                "its number of micro-batches is random). Received: steps_per_epoch=None. "
                "Keras would stop each epoch after the first epoch's count and cut "
                "logical steps in two. Use an endless make_poisson_dataset(steps=None) "
                "with steps_per_epoch, or epochs=1."
            )
        if self._secret.accumulators is None:
            raise ValueError("Compile the DPKerasModel before calling fit.")
        # Again here: an option set on the optimizer after compile.
        self._check_optimizer_clipping()
        self._label_spec = _label_spec(arguments)
        if not fit_inputs.is_array(data) and "shuffle" not in arguments:
            # Datasets and generators are never shuffled by Keras; its
            # default shuffle=True only draws a warning for them.
            arguments["shuffle"] = False
        # A partial logical step left by an earlier fit holds examples sampled
        # for THAT step; merging it into a new step could include an example
        # twice in one noisy update (sensitivity 2C). Drop it.
        self._reset_accumulators()
        callbacks = list(arguments.get("callbacks") or [])
        # Compiled metrics named like held-out or noise-covered values, then
        # callbacks deciding from noiseless training statistics.
        fit_inputs.check_fit(self, callbacks, self._release_train_metrics)
        debug_dumps.refuse_tensor_dumps()
        # The layers' `trainable` flags may have changed since compile
        # (traced again only then: model_analysis caches per flags).
        model_checks.check_model_is_dp_compatible(self)
        spend = self.privacy_budget
        if spend is not None:
            # Always, beside any accountant of the user's (one that only logs
            # epsilon removed the budget: review); the lowest cap holds.
            callbacks.append(
                PrivacyAccountant(spend.delta, spend.target_epsilon, accountant=spend.accountant)
            )
        if self._dp_config.sampling == "shuffled":
            callbacks = [dp_state.EpochOpener(self._secret.epoch_open)] + callbacks
        # After the callbacks that may set weights as arrays (a warm start),
        # before the next update and the sampler's resume: they bring what
        # those values went through. Mid-fit only where a user callback runs
        # code between updates (none: no cost).
        # A generator's code runs between updates too: it can snapshot the
        # weights there (review round 8, escape 18).
        input_code = fit_inputs.runs_code_between_updates(arguments.get("x"))
        between_batches = input_code or any(dp_state.sees_weights_mid_epoch(c) for c in callbacks)
        recall = dp_state.WeightsRecall(
            self,
            sampler,
            accountants=[c for c in callbacks if isinstance(c, PrivacyAccountant)],
            between_epochs=input_code
            or any(dp_state.sees_weights_between_epochs(c) for c in callbacks),
            between_batches=between_batches,
            epoch_open=self._secret.epoch_open if self._dp_config.sampling == "shuffled" else None,
        )
        callbacks.append(recall)
        if sampler is not None:
            # Last, after any callback that restores weights and the ledger
            # with them (BackupAndRestore), before the input is first read.
            callbacks.append(dp_state.SamplerResume(sampler, self._secret.position))
        if self._dp_config.sampling == "poisson":
            # The stream the identity check holds every micro-batch to.
            callbacks.append(dp_state.StreamPin(self._secret, self._dp_config, arguments.get("x")))
        arguments["callbacks"] = callbacks
        # Weights set as arrays since construction (set_weights from a
        # privately trained model) bring what they went through; what this
        # fit changes is remembered wherever a copy could be taken.
        memory = dp_state.WeightsMemory(self, ledger_lib.recall(self, self.privacy_ledger))
        arguments["callbacks"] = arguments["callbacks"] + [memory]
        if recall.looks_mid_fit:
            # First: sees each update's values before any user callback.
            after_update = dp_state.AfterUpdate(memory, recall, every_batch=between_batches)
            arguments["callbacks"] = [after_update] + arguments["callbacks"]
        try:
            return super().fit(**arguments)
        finally:
            memory.remember()
            # TensorFlow keeps what Keras read a generator through: let go of
            # the generator (and the pipelines it holds) once fit is over.
            fit_inputs.detach(arguments.get("x"))

    def save(self, filepath, *args, **kwargs):
        """`keras.Model.save`, refusing the legacy HDF5 format (it cannot hold the ledger).

        Raises:
          ValueError: for a `.h5`/`.hdf5` path.
        """
        fit_inputs.check_weight_file("filepath", filepath)
        return super().save(filepath, *args, **kwargs)

    def load_weights(self, filepath, *args, **kwargs):
        """`keras.Model.load_weights`; a file that holds a privacy ledger brings it.

        Raises:
          ValueError: for a legacy `.h5`/`.hdf5` file, which cannot hold the
            ledger of the updates its weights went through.
        """
        fit_inputs.check_weight_file("filepath", filepath)
        return super().load_weights(filepath, *args, **kwargs)

    def evaluate(self, *args, **kwargs):
        """`keras.Model.evaluate` (the test step is the plain one: no DP needed)."""
        bound = inspect.signature(keras.Model.evaluate).bind(self, *args, **kwargs)
        spec = _label_spec(bound.arguments)
        if spec is not None and self._label_spec is None:
            self._label_spec = spec
        return super().evaluate(*args, **kwargs)

    def train_on_batch(self, *args, **kwargs):
        """Refused: a single batch carries no sampling the accountant can count.

        Raises:
          ValueError: always. Under sampling="poisson" a batch outside a
            Poisson pipeline is not a Poisson sample; under
            sampling="shuffled" the epochs that the accounting counts are
            `fit`'s, and batches fed one by one could revisit an example
            within what would be counted as one epoch.
        """
        raise ValueError(
            "DPKerasModel.train_on_batch is not supported: the accountant could not "
            "know how the batch was sampled. Use fit() with "
            "tan_keras.make_poisson_dataset (sampling='poisson') or with "
            "in-memory arrays (sampling='shuffled')."
        )

    def make_train_function(self, force=False):
        """Keras's train function, without the placeholder of a step that releases nothing.

        With release_train_metrics=False and no noisy clipped fraction the
        train step returns one constant (Keras needs a tensor); the
        callbacks, the progress bar and History get empty logs instead.
        """
        if self.train_function is not None and not force:
            return self.train_function
        super().make_train_function(force=force)
        function = self.train_function
        checks_identity = self._dp_config.sampling == "poisson"

        # TensorFlow's C++ log of a kernel failing on the data, scrubbed too.
        stderr = step_stderr.StderrFilter(_scrubbed_log)

        def train_function(iterator):
            try:
                with stderr:
                    logs = function(iterator)
            except StopIteration:
                raise
            except tf.errors.OpError as error:
                # Withheld whatever op raised it: its message is computed
                # from the step's data.
                scrubbed = scrubbed_error(error)
            except Exception as error:
                # A traced step's Python errors are raised while tracing, on
                # symbolic tensors; a step run eagerly sees the data.
                if not self.run_eagerly or _raised_by_package(error):
                    raise
                scrubbed = _scrubbed_python_error(error)
            else:
                scrubbed = None
            if scrubbed is not None:
                # Raised outside the `except`: `from None` only hides the
                # original, whose text (the value) `__context__` would keep.
                raise scrubbed
            if checks_identity:
                # The compiled step blocked every update since the violation.
                self._raise_on_identity_violation()
            if not self._release_train_metrics:
                logs = {k: v for k, v in logs.items() if k != _NOTHING_RELEASED}
            return logs

        self.train_function = train_function
        return self.train_function

    def _poisson_sampler(self, data):
        """The sampler of a Poisson pipeline `fit` reads, checked against the model, or None.

        `fit` resumes it at the step the ledger releases next
        (`dp_state.SamplerResume`): a pipeline read again (a second fit, one
        drawn ahead by prefetching, weights restored by a callback) then
        continues where the released updates stopped, and the identity check
        finds each step exactly once.
        """
        if not isinstance(data, tf.data.Dataset) or self._dp_config.sampling != "poisson":
            return None
        source = sampling.poisson_source(data)
        if source is None:
            return None
        sampler, transformations = source
        sampling.check_transformations(transformations)
        drawn_for = (sampler.dataset_size, sampler.expected_batch_size)
        accounted = (self._dp_config.dataset_size, self._dp_config.expected_batch_size)
        if drawn_for != accounted:
            raise ValueError(
                "Invalid value for `x`: its PoissonSampler draws for (dataset_size, "
                f"expected_batch_size)={drawn_for} but the model accounts for {accounted}. "
                "Build the PoissonSampler with the model's values."
            )
        return sampler

    def _raise_on_identity_violation(self):
        record = self._secret.violation.numpy()
        if record[0] != step_identity.OK:
            config = self._dp_config
            raise step_identity.SamplingIdentityError(
                step_identity.describe(record, config.dataset_size, config.expected_batch_size)
            )

    def _check_layerwise_still_supported(self):
        """Refuses a model changed since the layerwise route was chosen for it.

        The route runs the layers on the whole micro-batch and contracts their
        activations: it is exact only for layers that map each row by itself
        (`layerwise.unsupported_reason`). A layer changed after `make_private`
        or `compile` (an activation that centres on the batch's mean, a
        Softmax over the batch axis) would mix the examples before clipping:
        a review measured 2.06 times the replace-one bound. So the reason is
        looked for again at every `fit`.

        Raises:
          ValueError: naming what the route cannot run any more.
        """
        if self._clipping != "layerwise":
            return
        reason = layerwise.unsupported_reason(self)
        if reason is not None:
            raise ValueError(
                "Invalid value for `clipping`: expected a route that runs the model as it "
                f"is now, but the model changed since clipping='layerwise' was chosen: "
                f"{reason}. Use clipping='vectorized' (exact for any model), or, with "
                "clipping='auto', compile again to choose the route anew. Received: "
                "clipping='layerwise'"
            )

    def _check_held_values(self):
        # What the traced computation holds, whatever reference led there: a
        # copy of training rows or of adapted statistics is refused; a value
        # private training or a private release left brings its ledger
        # (`ledger.recall` reads the fingerprints).
        values = model_analysis.held_values(self)
        provenance.discover_adapted()
        data_copies.check_values(values, f"The model `{self.name}`")
        # Constraints and weight regularizers act on the weights at every
        # update, outside the clipping: held data reaches them unbounded.
        values += model_checks.check_weight_functions(self)
        object.__setattr__(
            self, ledger_lib.HELD_VALUES_ATTRIBUTE, data_copies.value_fingerprints(values)
        )

    def _check_optimizer_clipping(self):
        # Keras applies clipnorm / global_clipnorm / clipvalue to each
        # replica's partial gradient before the all-reduce. Each partial sum
        # carries noise of std sigma*C/sqrt(R) only, and a nonlinear function
        # of the partials is not post-processing of the noisy total: with
        # R > 1 the accounted sigma would not hold.
        replicas = self.distribute_strategy.num_replicas_in_sync
        options = {
            name: getattr(self.optimizer, name, None)
            for name in ("clipnorm", "global_clipnorm", "clipvalue")
        }
        given = {name: value for name, value in options.items() if value is not None}
        if given and replicas > 1:
            name, value = next(iter(given.items()))
            raise ValueError(
                f"Invalid value for `{name}`: expected None with {replicas} replicas. "
                f"Received: {name}={value}. Keras clips each replica's partial gradient "
                "before summing them, and each partial carries only 1/sqrt(replicas) of "
                "the noise, so the accounted noise multiplier would not hold. Per-example "
                "clipping is l2_norm_clip; drop the optimizer's clipping (on one device it "
                "is allowed: it then acts on the whole noisy gradient)."
            )

    def _dp_build_for_fit(self):
        # Called by Keras under a strategy instead of reading a batch (see
        # _keras_internals.skip_first_batch_build): everything else was built
        # at compile; the compiled metrics need the labels' shape.
        if self._label_spec is not None:
            _keras_internals.build_compiled_metrics(self, self._label_spec)
