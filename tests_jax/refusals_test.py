"""The JAX backend refuses what the TensorFlow backend refuses, before any update.

Each habit a review found trained on JAX (while TensorFlow refused it) is
refused here with its message, and leaves the weights and `dp_steps` as
they were; the allowed variant of each trains (the power of the check).
"""

import _jax_helpers as helpers
import jax
import keras
import numpy as np
import pytest
from jax.experimental import io_callback
from keras import ops

import tan_keras
from tan_keras.mechanism import data_copies

N = 16


@pytest.fixture(autouse=True)
def _no_registered_rows():
    """Each test starts with no training rows or adapted state registered (data_copies.py)."""
    data_copies.forget()
    yield
    data_copies.forget()


def _regression(pre=None, shape=(3,)):
    inp = keras.Input(shape)
    h = pre(inp) if pre is not None else inp
    return keras.Model(inp, keras.layers.Dense(1)(h))


def _xy(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, 3)).astype("float32")
    y = rng.normal(size=(N, 1)).astype("float32")
    return x, y


def _private(model, loss="mse"):
    return helpers.private(model, N, batch=8, loss=loss)


def _refused(dp_model, match, x, y, **fit):
    """Asserts `fit` raises ValueError matching `match` and changes nothing."""
    before = [w.copy() for w in dp_model.get_weights()]
    with pytest.raises(ValueError, match=match):
        dp_model.fit(x, y, epochs=1, verbose=0, **fit)
    assert int(dp_model.dp_steps) == 0
    for a, b in zip(dp_model.get_weights(), before):
        np.testing.assert_array_equal(a, b)


def _trains(dp_model, x, y, **fit):
    changes = helpers.update(dp_model, x, y, **fit)
    assert int(dp_model.dp_steps) > 0
    assert any(np.any(c != 0) for c in changes)


# ---------------------------------------------------- callbacks on noiseless logs
@pytest.mark.parametrize(
    "callback",
    [
        lambda: keras.callbacks.EarlyStopping(monitor="loss", patience=0),
        lambda: keras.callbacks.ReduceLROnPlateau(monitor="loss"),
        keras.callbacks.TerminateOnNaN,
    ],
    ids=["EarlyStopping", "ReduceLROnPlateau", "TerminateOnNaN"],
)
def test_a_callback_deciding_from_the_noiseless_training_loss_is_refused(callback):
    x, y = _xy()
    _refused(
        _private(_regression()),
        r"monitor=\.\.\.\)`: expected a held-out statistic",
        x,
        y,
        callbacks=[callback()],
    )


def test_a_callback_on_held_out_data_or_unreleased_metrics_trains():
    x, y = _xy()
    x_val, y_val = _xy(seed=1)
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=5)
    _trains(_private(_regression()), x, y, validation_data=(x_val, y_val), callbacks=[stop])
    # Nothing is released: the noiseless loss is not in the logs.
    quiet = helpers.private(_regression(), N, batch=8, loss="mse", release_train_metrics=False)
    _trains(quiet, x, y, callbacks=[keras.callbacks.EarlyStopping(monitor="loss")])


# ------------------------------------------------------------ calls into Python
def _with_pure_callback(t):
    return jax.pure_callback(
        lambda a: np.asarray(a), jax.ShapeDtypeStruct(t.shape, t.dtype), t, vmap_method="sequential"
    )


@jax.jit
def _with_io_callback(t):
    # Inside a jit: found in the nested jaxpr.
    return io_callback(lambda a: np.asarray(a), jax.ShapeDtypeStruct(t.shape, t.dtype), t)


def _with_debug_callback(t):
    # Inside a cond branch: found in the nested jaxpr.
    def noisy(u):
        jax.debug.callback(lambda a: None, u)
        return u

    return jax.lax.cond(True, noisy, lambda u: u, t)


@pytest.mark.parametrize(
    "function, primitive",
    [
        (_with_pure_callback, "pure_callback"),
        (_with_io_callback, "io_callback"),
        (_with_debug_callback, "debug_callback"),
    ],
    ids=["pure_callback", "io_callback", "debug_callback"],
)
def test_a_layer_calling_back_into_python_is_refused_by_name(function, primitive):
    x, y = _xy()
    model = _regression(lambda t: keras.layers.Lambda(function, name="calls_python")(t))
    _refused(_private(model), rf"Layer `calls_python` runs Python code .*`{primitive}`", x, y)


def test_a_lambda_without_callbacks_trains():
    x, y = _xy()
    model = _regression(lambda t: keras.layers.Lambda(lambda u: 2.0 * u, name="pure")(t))
    _trains(_private(model), x, y)


# --------------------------------------------------------------- a loss's state
class _RunningSumLoss(keras.losses.Loss):
    def __init__(self, writes=True):
        super().__init__()
        self.writes = writes
        self.total = keras.Variable(0.0, trainable=False, name="running_sum")

    def call(self, y_true, y_pred):
        if self.writes:
            self.total.assign(self.total + ops.sum(y_true))
        return ops.square(y_true - y_pred - self.total)


def test_a_loss_writing_a_variable_is_refused():
    x, y = _xy()
    _refused(
        _private(_regression(), loss=_RunningSumLoss()),
        r"`loss`: expected a loss that keeps no state between examples.*`running_sum`",
        x,
        y,
    )


def test_a_loss_reading_a_variable_it_never_writes_trains():
    x, y = _xy()
    _trains(_private(_regression(), loss=_RunningSumLoss(writes=False)), x, y)


# ------------------------------------------------- copies of the training data
def test_a_normalization_adapted_on_the_training_set_is_refused():
    x, y = _xy()
    norm = keras.layers.Normalization()
    norm.adapt(x)
    model = _regression(norm)
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError, match=r"Layer `normalization\w*` .* set by `adapt`"):
        _private(model)
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)


def test_an_adapted_normalization_declared_public_trains_and_keeps_its_mark(tmp_path):
    x, y = _xy()
    public, _ = _xy(seed=2)
    norm = keras.layers.Normalization()
    norm.adapt(public)
    tan_keras.mark_public(norm, reason="adapted on public data")
    dp_model = _private(_regression(norm))
    _trains(dp_model, x, y)
    dp_model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert int(loaded.dp_steps) == int(dp_model.dp_steps)


def test_statistics_of_the_training_set_given_by_hand_are_refused():
    x, y = _xy()
    model = _regression(keras.layers.Normalization(mean=x.mean(0), variance=x.var(0)))
    _refused(_private(model), r"Layer `normalization\w*` .* the training data's own", x, y)


def test_public_statistics_given_by_hand_train():
    x, y = _xy()
    model = _regression(keras.layers.Normalization(mean=[0.1, -0.2, 0.3], variance=[1.0, 2.0, 3.0]))
    _trains(_private(model), x, y)


def test_a_lambda_closing_over_training_rows_is_refused():
    x, y = _xy()
    pool = x[:4].copy()
    model = _regression(
        lambda t: keras.layers.Lambda(lambda u: u + ops.mean(ops.convert_to_tensor(pool)))(t)
    )
    _refused(_private(model), r"holds `lambda\w*/constant` .* contains rows of the training", x, y)


def test_a_lambda_closing_over_public_rows_trains():
    x, y = _xy()
    pool, _ = _xy(seed=3)
    model = _regression(
        lambda t: keras.layers.Lambda(lambda u: u + ops.mean(ops.convert_to_tensor(pool[:4])))(t)
    )
    _trains(_private(model), x, y)


def test_validation_data_holding_training_rows_is_refused():
    x, y = _xy()
    _refused(
        _private(_regression()),
        r"`validation_data`: expected examples that are not training examples",
        x,
        y,
        validation_data=(x[:4], y[:4]),
    )


# ------------------------------------------- what only the gradient's trace shows
@jax.custom_vjp
def _identity_calling_back_when_differentiated(t):
    return t


def _forward(t):
    return t, None


def _backward_calling_python(_, g):
    # Runs only in the backward pass: a forward trace never sees it.
    return (_with_pure_callback(g),)


_identity_calling_back_when_differentiated.defvjp(_forward, _backward_calling_python)


@jax.custom_vjp
def _identity_with_a_pure_backward(t):
    return t


_identity_with_a_pure_backward.defvjp(_forward, lambda _, g: (2.0 * g,))


def _after_a_dense(function, name):
    # Behind a trained layer: its backward rule runs in the gradient.
    return lambda t: keras.layers.Lambda(function, name=name)(keras.layers.Dense(3)(t))


def test_a_custom_vjp_calling_back_into_python_in_its_backward_rule_is_refused():
    x, y = _xy()
    model = _regression(_after_a_dense(_identity_calling_back_when_differentiated, "backward_cb"))
    _refused(_private(model), r"Layer `backward_cb` runs Python code .*pure_callback", x, y)


def test_a_custom_vjp_with_a_pure_backward_rule_trains():
    x, y = _xy()
    _trains(_private(_regression(_after_a_dense(_identity_with_a_pure_backward, "pure"))), x, y)


class _CountsInAnUntrackedVariable(keras.layers.Layer):
    """Keeps a running sum of its inputs in a variable its weights do not list."""

    def __init__(self, writes=True, **kwargs):
        super().__init__(**kwargs)
        self.writes = writes
        with keras.src.utils.tracking.DotNotTrackScope():
            self.seen = keras.Variable(np.zeros(3, "float32"), trainable=False, name="seen")

    def call(self, t):
        if self.writes:
            self.seen.assign(self.seen + ops.sum(t, axis=0))
        return t + 0.0 * self.seen


def test_a_layer_writing_a_variable_it_does_not_track_is_refused():
    x, y = _xy()
    layer = _CountsInAnUntrackedVariable()
    assert not any(v is layer.seen for v in layer.weights)  # (the premise)
    _refused(
        _private(_regression(layer)), r"writes the variable `seen`, which it does not track", x, y
    )


def test_a_layer_reading_an_untracked_variable_it_never_writes_trains():
    x, y = _xy()
    _trains(_private(_regression(_CountsInAnUntrackedVariable(writes=False))), x, y)


def test_repeated_rows_given_with_a_source_is_refused_not_ignored():
    from tan_keras.data.image_views import AugmentedImages

    rng = np.random.default_rng(0)
    images = rng.uniform(size=(N, 8, 8, 3)).astype("float32")
    source = AugmentedImages(images, rng.integers(0, 2, size=N), augmult=1, policy="cifar")
    model = keras.Sequential(
        [keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(2)]
    )
    dp_model = _private(model, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(ValueError, match=r"`repeated_rows`: expected it only with in-memory"):
        dp_model.fit(source, epochs=1, verbose=0, repeated_rows="distinct_people")
    assert int(dp_model.dp_steps) == 0


# --------------------------------------------- batching rules that see every row
@jax.custom_batching.custom_vmap
def _centred(t):
    return t  # one example alone: unchanged


@_centred.def_vmap
def _centred_on_the_rows_mean(axis_size, in_batched, rows):
    # Under the per-example vmap this sees every row of the step.
    return rows - jax.numpy.mean(rows, axis=0, keepdims=True), True


def test_a_function_with_its_own_batching_rule_is_refused():
    # Review: one example moved the others' inputs (3.9x the bound).
    x, y = _xy()
    model = _regression(lambda t: keras.layers.Lambda(_centred, name="centres")(t))
    _refused(_private(model), r"Layer `centres` calls a function with a batching rule", x, y)


# ------------------------------------------------ constraints applied to the weights
class _TowardsAMean(keras.constraints.Constraint):
    """Writes a fixed vector (a mean, here) into the kernel after every update."""

    def __init__(self, mean):
        self.mean = mean

    def __call__(self, w):
        return 0.0 * w + ops.convert_to_tensor(self.mean)[:, None]


def _constrained(constraint):
    inp = keras.Input((3,))
    return keras.Model(inp, keras.layers.Dense(1, kernel_constraint=constraint)(inp))


def test_a_constraint_holding_a_statistic_of_the_training_data_is_refused():
    # Review: the constraint wrote x.mean(0) into the kernel (1000x the bound).
    x, y = _xy()
    model = _constrained(_TowardsAMean(x.mean(0)))
    _refused(_private(model), r"holds `dense\w*/kernel/constraint` .* per-feature mean", x, y)


def test_a_constraint_calling_back_into_python_is_refused():
    x, y = _xy()
    _refused(_private(_constrained(_with_pure_callback)), r"constraint of .* Python code", x, y)


@pytest.mark.parametrize(
    "constraint",
    [lambda: keras.constraints.MaxNorm(1.0), lambda: keras.constraints.NonNeg(), None],
    ids=["MaxNorm", "NonNeg", "public mean"],
)
def test_keras_constraints_and_public_constants_train(constraint):
    x, y = _xy()
    public, _ = _xy(seed=4)
    made = constraint() if constraint else _TowardsAMean(public.mean(0))
    _trains(_private(_constrained(made)), x, y)


class _HoldsRowsUnused(keras.constraints.Constraint):
    """Holds training rows its call does not read (a trace shows no constant)."""

    def __init__(self, rows):
        self.rows = rows

    def __call__(self, w):
        return w


def test_a_constraint_holding_training_rows_it_does_not_trace_is_refused():
    x, y = _xy()
    _refused(
        _private(_constrained(_HoldsRowsUnused(x[:4].copy()))),
        r"constraint\.rows` .* contains rows of the training",
        x,
        y,
    )
    public, _ = _xy(seed=5)  # the power check: public rows train
    _trains(_private(_constrained(_HoldsRowsUnused(public[:4]))), x, y)
