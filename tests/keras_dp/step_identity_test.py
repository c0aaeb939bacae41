"""Each logical step is used exactly once, in order and whole, whatever feeds fit.

Attacks: a Poisson pipeline tagged only with the (N, B) it was drawn for
survived `.cache()` (steps replayed and accounted as fresh ones), and any
transformation that replays, reorders, regroups or skips micro-batches. Now
every row carries its micro-batch's identity and the train step checks it
against the privacy ledger, on every input path Keras accepts (tf.data,
generators, `PyDataset`), with and without XLA. Each attack is also run with
the identity check disabled (power check): it then trains.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from _helpers import dense_model, dp_model, flat, micro_batches

from tan_keras.keras_dp import fit_inputs, step_identity
from tan_keras.keras_dp.callbacks import PrivacyAccountant
from tan_keras.mechanism import sampling

N, B = 64, 8
DP = dict(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=B, dataset_size=N)


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(N, 4)).astype(np.float32), rng.integers(0, 3, N).astype(np.int32)


def _pipeline(steps=None, physical=None, seed=None):
    x, y = _data()
    sampler = sampling.PoissonSampler(
        N, B, physical_batch_size=physical, pad_steps=physical is not None, secret_key=seed
    )
    return sampling.make_poisson_dataset(x, y, sampler, steps=steps)


def _generator(elements):
    def generate():
        yield from elements

    return generate()


class _Sequence(keras.utils.PyDataset):
    def __init__(self, elements):
        super().__init__()
        self._elements = elements

    def __len__(self):
        return len(self._elements)

    def __getitem__(self, index):
        return self._elements[index]


# Each attack: (model, feed) -> trains on a transformed pipeline; the message
# fragment it must be refused with.
def _cache_read_twice(model):
    cached = _pipeline(steps=3).cache()
    model.fit(cached, verbose=0)
    model.fit(cached, verbose=0)


def _restarted_generator(model):
    ds = _pipeline(steps=3)
    elements = list(ds.as_numpy_iterator())
    model.fit(_generator(elements), steps_per_epoch=3, verbose=0)
    model.fit(_generator(elements), steps_per_epoch=3, verbose=0)


def _shuffled_micro_batches(model):
    model.fit(_pipeline(steps=8).shuffle(8, seed=3), verbose=0)


def _skipped_steps(model):
    model.fit(_pipeline().skip(2), steps_per_epoch=3, verbose=0)


def _through_a_generator(dataset, count):
    """The elements of `dataset`, fed by a generator: fit cannot see how they were made."""
    return _generator(list(dataset.take(count).as_numpy_iterator()))


def _regrouped_rows(model):
    # Rows of two micro-batches in one element (P = 16 rows, regrouped by 24).
    ds = _pipeline(physical=16).unbatch().batch(24, drop_remainder=True)
    model.fit(_through_a_generator(ds, 3), steps_per_epoch=3, verbose=0)


def _split_micro_batches(model):
    # Each micro-batch cut in two halves: the halves reuse its identity.
    ds = _pipeline(physical=16).unbatch().batch(8, drop_remainder=True)
    model.fit(_through_a_generator(ds, 3), steps_per_epoch=3, verbose=0)


def _two_samplers_in_one_step(model):
    # Step 0's first micro-batch from one sampler, the rest from another:
    # together no Poisson sample (an example may be in both parts).
    a, b = _pipeline(physical=4, seed=1), _pipeline(physical=4, seed=2)
    model.fit(a.take(1).concatenate(b.skip(1)), steps_per_epoch=10, verbose=0)


def _flipped_step_end(model):
    ds = _pipeline(physical=4).map(lambda x, y, m, e, i: (x, y, m, tf.logical_not(e), i))
    model.fit(_through_a_generator(ds, 4), steps_per_epoch=4, verbose=0)


ATTACKS = {
    "cache": (_cache_read_twice, "replayed a Poisson step"),
    "generator": (_restarted_generator, "replayed a Poisson step"),
    "shuffle": (_shuffled_micro_batches, "skipped Poisson steps|replayed"),
    "skip": (_skipped_steps, "skipped Poisson steps"),
    "regroup": (_regrouped_rows, "belong to different micro-batches"),
    "split": (_split_micro_batches, "incomplete or out of order"),
    "two_samplers": (_two_samplers_in_one_step, "two different samplers"),
    "step_end": (_flipped_step_end, "step_end flag"),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_transformed_pipeline_is_refused_before_any_update(attack):
    run, message = ATTACKS[attack]
    model = dp_model(dense_model(), **DP)
    with pytest.raises(step_identity.SamplingIdentityError, match=message):
        run(model)


@pytest.mark.parametrize("attack", ["cache", "regroup", "two_samplers"])
def test_power_check_without_the_identity_check_the_attack_trains(attack, monkeypatch):
    monkeypatch.setattr(step_identity, "check", lambda *args, **kwargs: tf.constant(0, tf.int64))
    run, _ = ATTACKS[attack]
    model = dp_model(dense_model(), **DP)
    run(model)
    assert int(model.dp_steps.numpy()) >= 2


@pytest.mark.parametrize("jit_compile", [False, True])
def test_nothing_is_released_from_the_violation_on(jit_compile):
    model = dp_model(dense_model(), jit_compile=jit_compile, **DP)
    cached = _pipeline(steps=3).cache()
    model.fit(cached, verbose=0)
    assert int(model.dp_steps.numpy()) == 3
    weights = flat(model.get_weights())
    with pytest.raises(step_identity.SamplingIdentityError, match="steps 0..2"):
        model.fit(cached, verbose=0)
    assert int(model.dp_steps.numpy()) == 3
    np.testing.assert_array_equal(flat(model.get_weights()), weights)
    # A good pipeline afterwards trains again.
    model.fit(_pipeline(), steps_per_epoch=2, verbose=0)
    assert int(model.dp_steps.numpy()) == 5


def test_several_steps_per_execution_release_nothing_after_the_violation():
    model = dp_model(dense_model(), **DP)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=4,
    )
    # Steps 0, 1, then 1 again: the third element is refused, the fourth too.
    # The pipeline stays alive while fit runs, so that fit can pin its stream
    # (elements of pipelines no longer alive are refused: sampling_stream_test).
    pipeline = _pipeline(steps=2)
    elements = list(pipeline.as_numpy_iterator())
    with pytest.raises(step_identity.SamplingIdentityError, match="replayed"):
        model.fit(_generator(elements + elements), steps_per_epoch=4, verbose=0)
    assert int(model.dp_steps.numpy()) == 2


def test_reading_one_pipeline_in_several_fits_continues_where_updates_stopped(monkeypatch):
    # A fixed sampler key: with a fresh one, a step larger than the physical
    # batch (rare) spills into a second micro-batch and 2 fits hold fewer steps.
    monkeypatch.setattr(sampling, "entropy_int64", lambda: 12345)
    model = dp_model(dense_model(), **DP)
    ds = _pipeline()
    for _ in range(3):
        model.fit(ds, steps_per_epoch=2, epochs=2, verbose=0)
    assert int(model.dp_steps.numpy()) == 12
    # A finite pipeline read again draws new steps.
    finite = _pipeline(steps=2)
    for _ in range(3):
        model.fit(finite, verbose=0)
    assert int(model.dp_steps.numpy()) == 18


def test_a_step_cut_by_the_end_of_a_fit_is_drawn_again_whole():
    model = dp_model(dense_model(), **DP)
    ds = _pipeline(physical=4)  # about 2 micro-batches per step
    model.fit(ds, steps_per_epoch=3, verbose=0)
    spent = int(model.dp_steps.numpy())
    model.fit(ds, steps_per_epoch=9, verbose=0)
    assert int(model.dp_steps.numpy()) > spent


def test_micro_batches_without_identity_need_the_caller_opt_in():
    x, y = _data()
    plain = micro_batches(x[None, :B], y[None, :B], np.ones((1, B)), [True])
    model = dp_model(dense_model(), **DP)
    with pytest.raises(ValueError, match="caller_poisson"):
        model.fit(plain, verbose=0)
    assert int(model.dp_steps.numpy()) == 0
    caller = dp_model(dense_model(), **{**DP, "sampling": "caller_poisson"})
    accountant = PrivacyAccountant(delta=1e-5)
    caller.fit(plain, verbose=0, callbacks=[accountant])
    assert int(caller.dp_steps.numpy()) == 1
    # The accountant says its epsilon rests on an unchecked sampling.
    assert accountant.history[-1]["unchecked_sampling"] == 1


def test_plain_batches_are_refused_on_every_path():
    x, y = _data()
    model = dp_model(dense_model(), **DP)
    # In-memory arrays are sampled by the model itself (array_inputs_test).
    for feed in (
        dict(x=tf.data.Dataset.from_tensor_slices((x, y)).batch(B)),
        dict(x=_Sequence([(x[:B], y[:B])])),
    ):
        with pytest.raises(ValueError, match="Poisson sampling"):
            model.fit(**feed, verbose=0)
    assert int(model.dp_steps.numpy()) == 0
    assert fit_inputs.element_kind((x, y)) == fit_inputs.PLAIN


def test_element_selections_of_the_pipeline_train():
    model = dp_model(dense_model(), **DP)
    ds = _pipeline().prefetch(4).repeat().with_options(tf.data.Options())
    model.fit(ds, steps_per_epoch=4, verbose=0)
    assert int(model.dp_steps.numpy()) == 4


def _mix_up(x, y, m, e, i):
    return 0.5 * x + 0.5 * tf.reverse(x, [0]), y, m, e, i


@pytest.mark.parametrize(
    "transform,name",
    [
        (lambda ds: ds.map(_mix_up), "Map"),
        (lambda ds: ds.map(_mix_up, num_parallel_calls=2), "ParallelMap"),
        (lambda ds: tf.data.Dataset.zip((ds, ds)), "Zip"),
        (lambda ds: ds.flat_map(lambda *e: tf.data.Dataset.from_tensors(e)), "FlatMap"),
        (lambda ds: ds.unbatch().batch(8), "Batch"),
    ],
    ids=["map", "parallel_map", "zip", "flat_map", "batch"],
)
def test_a_function_over_the_micro_batch_is_refused_before_any_work(transform, name):
    # A map over a whole element could mix its rows (mix-up, batch
    # standardization) with its identity intact: refused where it is seen.
    model = dp_model(dense_model(), **DP)
    with pytest.raises(ValueError, match=f"`x`.*transformed by {name}"):
        model.fit(transform(_pipeline()), steps_per_epoch=2, verbose=0)
    assert int(model.dp_steps.numpy()) == 0
