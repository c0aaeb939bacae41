"""The accountant accounts the sampling that actually happened.

Attacks: `fit(x, y, batch_size=...)` (shuffled fixed-size batches) used to
only warn while the accountant reported the amplified Poisson epsilon; a
Poisson pipeline built for one (N, B) fed a model accounting for another
q, silently.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from _helpers import dense_model, dp_model, flat

from tan_keras.keras_dp import fit_inputs, step_identity
from tan_keras.keras_dp.callbacks import PrivacyAccountant
from tan_keras.mechanism import sampling
from tan_keras.privacy import accounting

N, B, DELTA = 64, 8, 1e-5
DP = dict(l2_norm_clip=1.0, noise_multiplier=2.0, expected_batch_size=B, dataset_size=N)


def _data(n=N):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, 3, n).astype(np.int32)


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("n,b", [(2 * N, B), (N, 2 * B)])
def test_a_poisson_pipeline_for_another_sampling_rate_is_refused(n, b, jit_compile):
    model = dp_model(dense_model(), jit_compile=jit_compile, **DP)
    x, y = _data(n)
    ds = sampling.make_poisson_dataset(x, y, sampling.PoissonSampler(n, b))
    before = flat(model.get_weights())
    with pytest.raises(ValueError, match=r"draws for .*accounts for \(64, 8\)"):
        model.fit(ds, steps_per_epoch=3, verbose=0)
    # Fed by a generator, whose sampler fit cannot see: the train step refuses it.
    with pytest.raises(step_identity.SamplingIdentityError, match="another .dataset_size"):
        model.fit(_generator(ds), steps_per_epoch=3, verbose=0)
    np.testing.assert_array_equal(flat(model.get_weights()), before)
    assert int(model.dp_steps.numpy()) == 0


def _generator(dataset):
    def elements():
        yield from dataset.as_numpy_iterator()

    return elements()


def test_the_matching_pipeline_trains():
    model = dp_model(dense_model(), **DP)
    x, y = _data()
    ds = sampling.make_poisson_dataset(x, y, sampling.PoissonSampler(N, B))
    model.fit(ds, steps_per_epoch=3, verbose=0)
    assert int(model.dp_steps.numpy()) >= 1


def test_power_check_without_the_identity_check_the_mismatch_trains(monkeypatch):
    monkeypatch.setattr(step_identity, "check", lambda *args, **kwargs: tf.constant(0, tf.int64))
    model = dp_model(dense_model(), **DP)
    x, y = _data(2 * N)
    ds = sampling.make_poisson_dataset(x, y, sampling.PoissonSampler(2 * N, B))
    model.fit(_generator(ds), steps_per_epoch=3, verbose=0)
    assert int(model.dp_steps.numpy()) >= 1


def test_distributed_input_is_checked_against_the_model_sampling():
    # A real (one-device) strategy: the default one hands back plain datasets.
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        model = dp_model(dense_model(), **DP)
    before = flat(model.get_weights())
    x, y = _data(2 * N)
    other = sampling.distribute_poisson_dataset(
        strategy, x, y, lambda: sampling.PoissonSampler(2 * N, B)
    )
    with pytest.raises(ValueError, match=r"draw for .*\(128, 8\).*accounts for \(64, 8\)"):
        model.fit(other, steps_per_epoch=3, verbose=0)
    # A distributed dataset that tan_keras did not make: its sampling is unknown.
    x, y = _data()
    foreign = strategy.experimental_distribute_dataset(
        sampling.make_poisson_dataset(x, y, sampling.PoissonSampler(N, B))
    )
    with pytest.raises(ValueError, match="not made by.*distribute_poisson_dataset"):
        model.fit(foreign, steps_per_epoch=3, verbose=0)
    np.testing.assert_array_equal(flat(model.get_weights()), before)
    assert int(model.dp_steps.numpy()) == 0
    # Power check: the matching per-host input trains.
    matching = sampling.distribute_poisson_dataset(
        strategy, x, y, lambda: sampling.PoissonSampler(N, B)
    )
    model.fit(matching, steps_per_epoch=3, verbose=0)
    assert int(model.dp_steps.numpy()) >= 1


def _shuffled_model(**kwargs):
    return dp_model(dense_model(), **{**DP, "sampling": "shuffled", **kwargs})


def test_shuffled_batches_are_accounted_per_epoch_without_amplification():
    model = _shuffled_model()
    x, y = _data()
    accountant = PrivacyAccountant(delta=DELTA)
    model.fit(x, y, batch_size=B, epochs=3, verbose=0, callbacks=[accountant])
    assert int(model.dp_steps.numpy()) == 3 * N // B
    assert int(model.dp_epochs.numpy()) == 3
    want = accounting.compute_shuffled_epsilon(2.0, 3, DELTA)
    assert accountant.history[-1]["epsilon"] == pytest.approx(want)
    # Far above what Poisson sampling at q = B/N would claim for these steps.
    assert want > 3 * accounting.compute_epsilon(2.0, B / N, 3 * N // B, DELTA)


def test_an_interrupted_epoch_that_released_an_update_is_counted():
    model = _shuffled_model()
    x, y = _data()

    class StopAfterOneBatch(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            self.model.stop_training = True

    for _ in range(2):
        model.fit(x, y, batch_size=B, epochs=1, verbose=0, callbacks=[StopAfterOneBatch()])
    assert int(model.dp_steps.numpy()) == 2 and int(model.dp_epochs.numpy()) == 2


def test_shuffled_budget_stops_before_the_epoch_that_would_exceed_it():
    model = _shuffled_model()
    x, y = _data()
    target = accounting.compute_shuffled_epsilon(2.0, 2, DELTA) * 1.01
    accountant = PrivacyAccountant(delta=DELTA, target_epsilon=target)
    model.fit(x, y, batch_size=B, epochs=5, verbose=0, callbacks=[accountant])
    assert int(model.dp_epochs.numpy()) == 2
    assert int(model.dp_steps.numpy()) == 2 * N // B
    assert accountant.epsilon() <= target


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(batch_size=2 * B), "batch_size"),
        (dict(batch_size=B, validation_split=0.5), "validation_split"),
    ],
)
def test_shuffled_arguments_that_break_the_partition_are_refused(kwargs, name):
    model = _shuffled_model()
    x, y = _data()
    with pytest.raises(ValueError, match=f"`{name}`"):
        model.fit(x, y, verbose=0, **kwargs)


def test_shuffled_refuses_another_dataset_size_and_datasets():
    model = _shuffled_model()
    x, y = _data(N + 1)
    with pytest.raises(ValueError, match="`dataset_size`"):
        model.fit(x, y, batch_size=B, verbose=0)
    x, y = _data()
    with pytest.raises(ValueError, match="`x`"):
        model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(B), verbose=0)
    poisson = sampling.make_poisson_dataset(x, y, sampling.PoissonSampler(N, B))
    with pytest.raises(ValueError, match="`sampling`"):
        model.fit(poisson, steps_per_epoch=1, verbose=0)
    assert int(model.dp_steps.numpy()) == 0


def test_element_kinds():
    assert fit_inputs.element_kind((1, 2, 3, 4, 5)) == fit_inputs.POISSON
    assert fit_inputs.element_kind((1, 2, 3, 4)) == fit_inputs.MICRO_BATCHES
    assert fit_inputs.element_kind((1, 2)) == fit_inputs.PLAIN


def test_bad_sampling_mode_is_refused_by_name():
    with pytest.raises(ValueError, match="`sampling`"):
        _shuffled_model(sampling="uniform")


@pytest.mark.parametrize("mode", ["poisson", "shuffled"])
def test_train_on_batch_is_refused(mode):
    # Shuffled: batches fed one by one would never open a new epoch, so the
    # per-epoch accounting would under-count.
    model = dp_model(dense_model(), **{**DP, "sampling": mode})
    x, y = _data()
    with pytest.raises(ValueError, match="train_on_batch"):
        model.train_on_batch(x[:B], y[:B])
    assert int(model.dp_steps.numpy()) == 0
