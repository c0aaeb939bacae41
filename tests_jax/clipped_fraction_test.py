"""The privately released clipped fraction on the JAX backend: its noise, its accounting."""

import _jax_helpers as helpers
import jax
import numpy as np
import pytest

from tan_keras.jax_dp import clipped_fraction
from tan_keras.jax_dp.jax_step import training_state
from tan_keras.privacy import accounting, releases

ROWS, BATCH, STD = 16, 8, 0.1
DRAWS = 3000


def _released_fractions(dp_model, x, y, draws):
    """The fraction each of `draws` steps on the same rows releases (one key each)."""
    dp_model._symbolic_build(data_batch=(x[:1], y[:1]))
    state = training_state(dp_model)
    step_fn = jax.jit(dp_model.train_step)
    rng = np.random.default_rng(7)
    values = []
    for _ in range(draws):
        key = rng.integers(0, 2**32, 2, dtype=np.uint32)
        step = {
            "keep": np.ones(len(y), bool),
            "noise_key": np.tile(key, (len(y), 1)),
            "step": np.zeros(len(y), np.int32),
        }
        logs, _ = step_fn(state, (x, y, step))
        values.append(float(logs[clipped_fraction.NAME]))
    return np.asarray(values)


@pytest.mark.parametrize("scale", [1.0, 1.1, 1 / 1.1])
def test_released_fraction_has_std_s_and_mean_count_over_b(scale, monkeypatch):
    # scale != 1 is the power check: a count noise 10% too large or too
    # small is rejected. The keys are fixed: the outcome is deterministic.
    # Standard error of the std over 3000 draws: 1.3%; the bound, 5%.
    if scale != 1.0:
        original = clipped_fraction.noisy_count
        monkeypatch.setattr(
            clipped_fraction,
            "noisy_count",
            lambda count, key, stddev: original(count, key, stddev * scale),
        )
    x, y = helpers.data(ROWS)
    # C tiny: every row is clipped, the count is ROWS.
    dp_model = helpers.private(
        helpers.dense_model(),
        ROWS,
        batch=BATCH,
        l2_norm_clip=1e-6,
        noise_multiplier=1.0,
        clipped_fraction_std=STD,
        release_train_metrics=False,
    )
    values = _released_fractions(dp_model, x, y, DRAWS)
    std_ok = abs(values.std(ddof=1) / STD - 1) < 0.05
    assert std_ok == (scale == 1.0)
    assert abs(values.mean() - ROWS / BATCH) < 4 * STD * scale / np.sqrt(DRAWS)


def test_the_count_is_accounted_with_the_update_and_released_alone():
    x, y = helpers.data(ROWS)
    dp_model = helpers.private(
        helpers.dense_model(),
        ROWS,
        batch=BATCH,
        noise_multiplier=1.0,
        clipped_fraction_std=STD,
        release_train_metrics=False,
    )
    effective = accounting.effective_noise_multiplier(1.0, STD * BATCH)
    assert effective < 1.0
    assert dp_model.dp_config.mechanism.noise_multiplier == effective
    history = dp_model.fit(x, y, epochs=1, verbose=0)
    # Released without the training statistics; noisy, so not exactly a
    # fraction of the 8 expected examples.
    assert set(history.history) == {clipped_fraction.NAME}
    steps = int(dp_model.dp_steps)
    alone = releases.composed_epsilon(
        [releases.LedgerEntry(releases.Mechanism("poisson", 1.0, ROWS, BATCH), steps)],
        1e-5,
        "rdp",
    )
    assert dp_model.privacy_ledger.epsilon(1e-5) > alone
