"""Review 6: no value of the training data in an error raised by a private fit.

The scrubbing of a failing step's error went by a list of leaky message
forms; a custom layer's `tf.debugging.Assert(tf.reduce_all(t < 50.), [t])`
was not on it, and `fit` raised "assertion failed: [[1234.5 6789.25
4242.125 1 2 3]]", a private row verbatim. Now every TensorFlow error of the
step is withheld by default: only its type, the failing op, where the op
was defined, the package's own messages and forms known to hold no value
are kept (`fit_entry.scrubbed_error`), and TensorFlow's C++ log of the
failure likewise (`fit_entry._scrubbed_log`). Each test has its power
check: the same layer in a plain Keras fit puts the planted values in the
message.
"""

import traceback

import keras
import numpy as np
import pytest
import tensorflow as tf

import tan_keras
from tan_keras.keras_dp import fit_entry

N, D = 8, 6
ROW = [1234.5, 6789.25, 4242.125, 1.0, 2.0, 3.0]
PLANTED = ("1234.5", "6789.25", "4242.125")


def _asserted(t):
    # The reviewer's layer: a range check printing the checked tensor.
    tf.debugging.Assert(tf.reduce_all(t < 50.0), [t], summarize=20)
    return t


def _formatted(t):
    # A check of one's own, its message formatted from the data.
    message = tf.strings.format("row out of range: {}", t, summarize=20)
    tf.debugging.Assert(tf.reduce_all(t < 50.0), [message])
    return t


def _parsed(t):
    # A string op failing on text made of the data.
    text = tf.strings.as_string(t, precision=3) + tf.where(t > 50.0, "x", "")
    return tf.strings.to_number(text)


def _numerics(t):
    # check_numerics: its fixed sentence is kept.
    return tf.debugging.check_numerics(tf.math.log(50.0 - t), "log of the margin")


_CHECKS = {
    "assert": _asserted,
    "formatted": _formatted,
    "string_to_number": _parsed,
    "check_numerics": _numerics,
}


class _Checked(keras.layers.Layer):
    def __init__(self, check="assert", **kwargs):
        super().__init__(**kwargs)
        self.check = check

    def call(self, t):
        return _CHECKS[self.check](t)


def _model(check):
    keras.utils.set_random_seed(3)
    inputs = keras.Input((D,))
    hidden = keras.layers.Dense(4, activation="relu")(_Checked(check)(inputs))
    return keras.Model(inputs, keras.layers.Dense(3)(hidden))


def _data():
    x = np.random.default_rng(0).normal(size=(N, D)).astype("float32")
    # The reviewer planted one record; here every record holds the planted
    # values (their other columns differ), so that the first step fails.
    x[:, :3] = ROW[:3]
    return x, (np.arange(N) % 3).astype("int32")


def _fit(model, **compile_options):
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **compile_options,
    )
    x, y = _data()
    with pytest.raises(Exception) as raised:
        model.fit(x, y, batch_size=N, epochs=1, verbose=0)
    return raised.value


def _private(check):
    return tan_keras.make_private(
        _model(check),
        l2_norm_clip=1.0,
        noise_multiplier=1.0,
        expected_batch_size=N,
        dataset_size=N,
    )


def _everything_printed(error):
    """The error's text, its traceback and every chained exception's."""
    texts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        texts.append("".join(traceback.format_exception(type(error), error, error.__traceback__)))
        error = error.__cause__ or error.__context__
    return "\n".join(texts)


def _planted_in(text):
    return [value for value in PLANTED if value in text]


@pytest.mark.parametrize("check", sorted(_CHECKS))
def test_an_error_of_a_custom_layer_withholds_the_private_row(check):
    error = _fit(_private(check))
    assert isinstance(error, tf.errors.InvalidArgumentError), repr(error)
    assert _planted_in(_everything_printed(error)) == [], str(error)
    assert error.__cause__ is None and error.__context__ is None
    message = str(error)
    # What failed, where, and how to see the rest.
    assert "InvalidArgumentError" in message and "withheld" in message
    assert "plain Keras" in message
    assert "The op was defined at" in message, message
    if check == "check_numerics":
        assert "Tensor had NaN values" in message, message
    if check in ("assert", "formatted"):
        assert "Assert" in message, message


@pytest.mark.parametrize("check", ["assert", "string_to_number"])
def test_power_check_plain_keras_prints_the_private_row(check):
    error = _fit(_model(check))
    assert isinstance(error, tf.errors.InvalidArgumentError), repr(error)
    assert _planted_in(str(error)), str(error)


def test_power_check_the_reviewer_s_message_names_the_row():
    # What scrubbed_error is given from the private fit itself.
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        tf.function(_asserted)(tf.constant([ROW]))
    assert _planted_in(str(raised.value.message)) == list(PLANTED)
    scrubbed = str(fit_entry.scrubbed_error(raised.value))
    assert _planted_in(scrubbed) == [] and "withheld" in scrubbed


def test_tensorflow_s_log_of_the_failure_is_withheld_whatever_its_form():
    log = (
        "I0000 00:00:1796683965.369425   26420 port.cc:153] oneDNN custom operations are on.\n"
        "W0000 00:00:1796684000.047408   26814 local_rendezvous.cc:412] Local rendezvous is "
        "aborting with status: INVALID_ARGUMENT: assertion failed: [[1234.5 6789.25 4242.125]\n"
        " [1 2 3]]\n"
        "\t [[{{node loop_body/checked/Assert/AssertGuard/Assert}}]]\n"
        "W0000 00:00:1796684053.870055   27561 op_kernel.cc:1845] INVALID_ARGUMENT: "
        "ValueError: bad row [[1234.5    2. ]]\n"
        "Traceback (most recent call last):\n"
        '  File "layer.py", line 13, in py\n'
        "ValueError: bad row 6789.25 4242.125\n"
        "I0000 00:00:1796684053.9 27561 service.cc:152] XLA service initialized\n"
    )
    scrubbed = fit_entry._scrubbed_log(log)
    assert _planted_in(scrubbed) == [], scrubbed
    assert "withheld" in scrubbed and "INVALID_ARGUMENT" in scrubbed
    # Informational lines stay as they were.
    assert "oneDNN custom operations are on." in scrubbed
    assert "XLA service initialized" in scrubbed


def test_a_python_error_of_a_step_run_eagerly_is_withheld():
    # (A private step traces each example's forward even with run_eagerly=True,
    # so a layer's Python code sees no value; what else runs eagerly is
    # withheld all the same, unless the package raised it.)
    try:
        raise ValueError(f"row out of range: {ROW}")
    except ValueError as error:
        original = error
    assert _planted_in(str(original))  # power check
    assert not fit_entry._raised_by_package(original)
    scrubbed = fit_entry._scrubbed_python_error(original)
    assert isinstance(scrubbed, ValueError)
    assert _planted_in(str(scrubbed)) == [] and "run_eagerly" in str(scrubbed)
    assert "review6_error_messages_test.py" in str(scrubbed)
