"""`private_adapt`: a Normalization adapted with noise, accounted in the model's epsilon.

The release is recorded in the ledger of the layer's weights, so that a
private model built over them (before or after) composes it: its epsilon is
larger than the training's alone, and equals `releases.composed_epsilon` of
both. Power check: without the ledger entry the epsilon is the training's
alone. The statistics approach the true ones for a large N; bad arguments
are refused before the data is read; the model saves, reloads and trains.
"""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from _helpers import LOSS

import tan_keras
from tan_keras.keras_dp.callbacks import PrivacyAccountant
from tan_keras.mechanism import noise, provenance, sampling
from tan_keras.privacy import releases

N, B, DELTA, SIGMA = 64, 16, 1e-5, 2.0
DP = dict(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=B, dataset_size=N)
BOUNDS = dict(lower=-20.0, upper=20.0)


def _data(n=N, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, 3)) * [1.0, 2.0, 3.0] + [5.0, -1.0, 0.0]).astype(np.float32)
    return x, rng.integers(0, 2, n).astype(np.int32)


def _model(norm):
    inp = keras.Input((3,))
    return keras.Model(inp, keras.layers.Dense(2)(norm(inp)))


def _train(private, steps=2):
    x, y = _data()
    private.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    sampler = sampling.PoissonSampler(N, B)
    private.fit(sampling.make_poisson_dataset(x, y, sampler), steps_per_epoch=steps, verbose=0)
    return private


def _epsilon(private):
    accountant = PrivacyAccountant(delta=DELTA)
    accountant.set_model(private)
    return accountant.epsilon()


def _gaussian_entries(private):
    return [e for e in private.privacy_ledger.entries() if e.mechanism.kind == "gaussian"]


@pytest.mark.parametrize("order", ["before make_private", "after make_private"])
def test_the_release_is_composed_into_the_models_epsilon(order):
    x, _ = _data()
    norm = keras.layers.Normalization()
    if order == "before make_private":
        tan_keras.private_adapt(norm, x, noise_multiplier=SIGMA, **BOUNDS)
        private = tan_keras.make_private(_model(norm), **DP)
    else:
        private = tan_keras.make_private(_model(norm), **DP)
        tan_keras.private_adapt(norm, x, noise_multiplier=SIGMA, **BOUNDS)
    _train(private)
    (entry,) = _gaussian_entries(private)
    assert entry.mechanism == releases.Mechanism("gaussian", SIGMA) and entry.steps == 1
    training = [e for e in private.privacy_ledger.entries() if e.mechanism.kind == "poisson"]
    assert training[0].steps == 2
    eps = _epsilon(private)
    assert eps == pytest.approx(releases.composed_epsilon([entry, *training], DELTA))
    # Power check: the training alone costs less.
    assert eps > releases.composed_epsilon(training, DELTA) + 0.1


def test_power_check_without_the_ledger_entry_the_epsilon_is_the_trainings_alone(monkeypatch):
    x, _ = _data()
    norm = keras.layers.Normalization()
    monkeypatch.setattr(tan_keras.keras_dp.ledger.PrivacyLedger, "record_release", lambda *a: None)
    tan_keras.private_adapt(norm, x, noise_multiplier=SIGMA, **BOUNDS)
    private = _train(tan_keras.make_private(_model(norm), **DP))
    assert not _gaussian_entries(private)
    training = [e for e in private.privacy_ledger.entries()]
    assert _epsilon(private) == pytest.approx(releases.composed_epsilon(training, DELTA))


def test_each_call_is_one_more_release():
    x, _ = _data()
    norm = keras.layers.Normalization()
    for _ in range(2):
        tan_keras.private_adapt(norm, x, noise_multiplier=SIGMA, **BOUNDS)
    private = tan_keras.make_private(_model(norm), **DP)
    assert _gaussian_entries(private)[0].steps == 2


@pytest.mark.parametrize("axis", [-1, None])
def test_the_statistics_are_close_to_the_true_ones_for_a_large_n(axis):
    n, sigma = 200_000, 1.0
    rng = np.random.default_rng(3)
    # Images [n, 4, 4, 2]: each example's moments average over its positions.
    x = (rng.normal(size=(n, 4, 4, 2)) * [1.0, 3.0] + [2.0, -4.0]).astype(np.float32)
    # Public bounds: 5 stds around each channel's mean (one pair for axis=None).
    lower, upper = (np.array([-3.0, -19.0]), np.array([7.0, 11.0])) if axis else (-19.0, 11.0)
    norm = keras.layers.Normalization(axis=axis)
    stats = tan_keras.private_adapt(norm, x, lower=lower, upper=upper, noise_multiplier=sigma)
    reference = keras.layers.Normalization(axis=axis)
    reference.adapt(x)
    assert stats.count == n
    width, d = np.asarray(upper) - lower, 2 if axis == -1 else 1
    mean_std = width * sigma * np.sqrt(2 * d) / n
    np.testing.assert_allclose(stats.mean_noise_std, mean_std)
    # Within 6 noise stds (variance: its noise is at most 3 width^2 sigma sqrt(2d) / N).
    error = np.abs(np.ravel(norm.adapt_mean) - np.ravel(reference.adapt_mean))
    assert np.all(error < 6 * mean_std + 1e-4), (error, mean_std)
    error = np.abs(np.ravel(norm.adapt_variance) - np.ravel(reference.adapt_variance))
    assert np.all(error < 6 * 3 * width**2 * sigma * np.sqrt(2 * d) / n + 1e-3), error
    # The layer normalizes with them.
    out = norm(x[:2000]).numpy()
    assert abs(out.mean()) < 0.1 and abs(out.var() - 1) < 0.1


def test_a_batched_dataset_gives_the_statistics_of_its_array():
    x, _ = _data(n=4000)
    kwargs = dict(noise_multiplier=1.0, noise_seed=5, **BOUNDS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", noise.NotPrivateWarning)
        from_array = tan_keras.private_adapt(keras.layers.Normalization(), x, **kwargs)
        dataset = tf.data.Dataset.from_tensor_slices((x, np.zeros(len(x)))).batch(300)
        from_dataset = tan_keras.private_adapt(keras.layers.Normalization(), dataset, **kwargs)
    np.testing.assert_allclose(from_dataset.mean, from_array.mean, rtol=1e-9)
    np.testing.assert_allclose(from_dataset.variance, from_array.variance, rtol=1e-9)


def test_a_seed_warns_that_the_release_is_not_private():
    x, _ = _data()
    with pytest.warns(noise.NotPrivateWarning, match="NOT private"):
        tan_keras.private_adapt(
            keras.layers.Normalization(), x, noise_seed=1, lower=-1, upper=1, noise_multiplier=1.0
        )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(noise_multiplier=0.0), "`noise_multiplier`: expected a finite float > 0"),
        (dict(noise_multiplier=float("nan")), "`noise_multiplier`: expected a finite float > 0"),
        (dict(lower=1.0, upper=1.0), "`upper`: expected bounds greater than `lower`"),
        (dict(lower=-1e308, upper=1e308), "`upper`: expected bounds .* by a finite width"),
        (dict(lower=[0.0, 1.0]), "`lower`: expected a finite float or an array"),
        (dict(upper=float("inf")), "`upper`: expected a finite float"),
        (dict(noise_seed=-1), "`noise_seed`: expected an integer >= 0"),
        (dict(data="texts"), "`data`: expected a numpy array, a tensor or a batched"),
        (dict(layer=keras.layers.Dense(2)), "`layer`: expected a keras.layers.Normalization"),
        (
            dict(layer=keras.layers.Normalization(mean=0.0, variance=1.0)),
            "`layer`: expected a Normalization layer without `mean`",
        ),
        (dict(data=np.zeros(10, np.float32)), "`layer`: expected a Normalization whose kept"),
    ],
)
def test_bad_arguments_are_refused_before_any_release(kwargs, match):
    x, _ = _data()
    arguments = dict(layer=keras.layers.Normalization(), data=x, noise_multiplier=1.0, **BOUNDS)
    arguments.update(kwargs)
    layer = arguments.pop("layer")
    data = arguments.pop("data")
    with pytest.raises(ValueError, match=match):
        tan_keras.private_adapt(layer, data, **arguments)
    if isinstance(layer, keras.layers.Normalization) and layer.weights:
        assert provenance.mark_of(layer) is None
        assert tan_keras.keras_dp.ledger.ledger_of(layer.weights) is None


def test_a_privately_adapted_model_saves_reloads_and_trains(tmp_path):
    x, _ = _data()
    norm = keras.layers.Normalization(name="norm")
    tan_keras.private_adapt(norm, x, noise_multiplier=SIGMA, **BOUNDS)
    private = _train(tan_keras.make_private(_model(norm), **DP))
    path = str(tmp_path / "private.keras")
    private.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.get_layer("norm").mean, norm.mean)
    assert provenance.mark_of(loaded.get_layer("norm")).provenance == provenance.PRIVATE
    assert _gaussian_entries(loaded)[0].steps == 1
    _train(loaded)
    assert int(loaded.dp_steps.numpy()) == 4
    assert _epsilon(loaded) > _epsilon(private)
    # Adapted again without noise after the reload: refused.
    loaded.get_layer("norm").adapt(x)
    with pytest.raises(ValueError, match="changed since it was privately adapted"):
        _train(loaded)
