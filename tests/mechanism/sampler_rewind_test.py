"""A sampler sent back to a step it has drawn draws it again from a fresh key.

Review round 8, escapes 16/17: code read each of two pipelines' next batch
ahead (iterating them, or `sampler.sample_indices(step)`), then ran a
one-step `fit` on the one whose batch held a target example; `fit` resumed
that pipeline at the ledger's step, so the batch it had read was the one
trained on (target in 0.55 of the updates against q = 0.25). Escape 10: two
models fed from one pipeline trained on the same batches, counted as
independent. Now `resume_at` back to a drawn step gives a secret, local key
a fresh value: what outside code read is never what trains. Each test has a
power check: with the key kept (the old behaviour), the batch read is the
batch drawn.
"""

import keras
import numpy as np
import pytest
from _helpers import LOSS, dense_model

import tan_keras
from tan_keras.mechanism import sampling

N, B = 64, 16


def _peek(sampler, how):
    """The indices of the sampler's next step, read the way the attack read them."""
    if how == "sample_indices":
        return sampler.sample_indices(sampler.next_step).numpy()
    dataset = sampler.micro_batches(steps=1)
    indices, mask = next(iter(dataset))[:2]
    return indices.numpy()[mask.numpy() > 0]


@pytest.mark.parametrize("power_check", [False, True])
@pytest.mark.parametrize("how", ["sample_indices", "iteration"])
def test_a_step_read_ahead_is_drawn_again_from_a_fresh_key(how, power_check):
    sampler = sampling.PoissonSampler(N, B)
    peeked = _peek(sampler, how)
    key = int(sampler.key.numpy())
    sampler.resume_at(0, keep_key=power_check)  # what fit does before reading
    drawn = sampler.sample_indices(0).numpy()
    if power_check:
        assert int(sampler.key.numpy()) == key
        np.testing.assert_array_equal(drawn, peeked)
    else:
        assert int(sampler.key.numpy()) != key
        assert not np.array_equal(drawn, peeked)


def test_moving_forward_keeps_the_key():
    """A restored run resumes exactly: resume_at to a step not yet drawn keeps the key."""
    sampler = sampling.PoissonSampler(N, B)
    key = int(sampler.key.numpy())
    sampler.resume_at(5)
    assert int(sampler.key.numpy()) == key
    sampler.sample_indices(5)  # read ahead, then resumed at the same step: drawn
    sampler.resume_at(7)
    assert int(sampler.key.numpy()) == key


@pytest.mark.parametrize("kind", ["seed", "secret_key"])
def test_a_shared_or_seeded_key_is_kept(kind):
    """Hosts sharing a key must all draw the same batches; a seed is reproducible by design."""
    with pytest.warns(tan_keras.NotPrivateWarning) if kind == "seed" else _no_warning():
        sampler = sampling.PoissonSampler(N, B, **{kind: 3})
    key = int(sampler.key.numpy())
    sampler.sample_indices(0)
    sampler.resume_at(0)
    assert int(sampler.key.numpy()) == key


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("power_check", [False, True])
def test_fits_fed_from_a_pipeline_read_ahead_never_train_on_what_was_read(power_check, monkeypatch):
    """One-step fits on a pipeline read ahead; then a second model fed from the same pipeline."""
    if power_check:
        original = sampling.PoissonSampler.resume_at
        monkeypatch.setattr(
            sampling.PoissonSampler,
            "resume_at",
            lambda self, step, keep_key=False: original(self, step, keep_key=True),
        )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 4)).astype(np.float32)
    y = rng.integers(0, 3, N).astype(np.int32)
    sampler = sampling.PoissonSampler(N, B, physical_batch_size=N, pad_steps=True)
    pipeline = sampling.make_poisson_dataset(x, y, sampler)
    streams = []
    for _ in range(2):  # two models, each fed one step from the same pipeline
        private = tan_keras.make_private(
            dense_model(),
            l2_norm_clip=1.0,
            noise_multiplier=1.0,
            expected_batch_size=B,
            dataset_size=N,
        )
        private.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
        read_ahead = sampler.stream_id(sampling.source_fingerprint(x, y)).numpy()
        sampler.sample_indices(sampler.next_step)  # the attack reads the next step
        private.fit(pipeline, steps_per_epoch=1, verbose=0)
        assert int(private.dp_steps.numpy()) == 1
        streams.append((read_ahead, private._secret.pinned_source.numpy()))
    for read_ahead, trained in streams:
        # The stream the fit pinned is the one read ahead only without the fresh key.
        assert (read_ahead == trained) == power_check
