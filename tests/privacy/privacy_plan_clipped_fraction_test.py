"""make_plan with a noisy clipped fraction: accounted with sigma_eff, calibrated through it."""

import pytest

from tan_keras.privacy import accounting, tan
from tan_keras.privacy.plan import make_plan

N, B, S, DELTA, STD = 50_000, 256, 1000, 1e-5, 0.05
RUN = dict(dataset_size=N, batch_size=B, steps=S, delta=DELTA)


def _effective(sigma, count_std):
    return (sigma**-2 + count_std**-2) ** -0.5


def test_noise_multiplier_mode_accounts_with_the_effective_sigma():
    plan = make_plan(**RUN, noise_multiplier=3.0, clipped_fraction_std=STD)
    plain = make_plan(**RUN, noise_multiplier=3.0)
    effective = _effective(3.0, STD * B)
    assert plan.noise_multiplier == 3.0
    assert plan.accounted_noise_multiplier == pytest.approx(effective)
    assert plan.epsilon == accounting.compute_epsilon(effective, B / N, S, DELTA)
    assert plan.epsilon > plain.epsilon
    assert plan.eta == pytest.approx(tan.eta(effective, B / N, S))
    assert plan.clipped_fraction_epsilon == accounting.compute_epsilon(STD * B, B / N, S, DELTA)
    numbers = plan.to_dict()
    assert numbers["clipped_fraction_std"] == STD
    assert numbers["accounted_noise_multiplier"] == pytest.approx(effective)
    assert numbers["clipped_fraction_epsilon"] == pytest.approx(plan.clipped_fraction_epsilon)
    off = plain.to_dict()
    assert [off[k] for k in ("clipped_fraction_std", "accounted_noise_multiplier")] == [None] * 2
    assert off["clipped_fraction_epsilon"] is None
    assert plain.accounted_noise_multiplier == 3.0


def test_target_eps_mode_never_exceeds_the_target():
    plan = make_plan(**RUN, target_eps=2.0, clipped_fraction_std=STD)
    plain = make_plan(**RUN, target_eps=2.0)
    assert plan.epsilon <= 2.0
    assert plan.epsilon == accounting.compute_epsilon(
        plan.accounted_noise_multiplier, B / N, S, DELTA
    )
    # The calibrated sigma_eff is the plain run's sigma; the gradient's is larger.
    assert plan.accounted_noise_multiplier >= plain.noise_multiplier
    assert plan.accounted_noise_multiplier == pytest.approx(plain.noise_multiplier, rel=1e-9)
    assert plan.noise_multiplier > plain.noise_multiplier


def test_target_eps_mode_refuses_a_count_noisier_than_the_budget_allows():
    sigma_eff = make_plan(**RUN, target_eps=2.0).noise_multiplier
    bound = sigma_eff / B
    with pytest.raises(
        ValueError, match="Invalid value for `clipped_fraction_std`: expected a float >"
    ):
        make_plan(**RUN, target_eps=2.0, clipped_fraction_std=0.99 * bound)
    # Just above the bound works, with a large gradient sigma.
    plan = make_plan(**RUN, target_eps=2.0, clipped_fraction_std=1.01 * bound)
    assert plan.epsilon <= 2.0 and plan.noise_multiplier > 5 * sigma_eff


def test_simulation_keeps_the_fraction_std_so_both_runs_account_their_own_count():
    plan = make_plan(
        dataset_size=N,
        batch_size=32,
        steps=S,
        delta=DELTA,
        ref_batch_size=B,
        ref_noise_multiplier=3.0,
        clipped_fraction_std=STD,
    )
    ref_effective = _effective(3.0, STD * B)
    sim_effective = _effective(3.0 * 32 / B, STD * 32)
    assert plan.reference.epsilon == accounting.compute_epsilon(ref_effective, B / N, S, DELTA)
    assert plan.epsilon == accounting.compute_epsilon(sim_effective, 32 / N, S, DELTA)
    # sigma_eff / B is the same for both: so is eta.
    assert plan.reference.eta == pytest.approx(plan.eta)
    assert plan.reference.eta == pytest.approx(tan.eta(ref_effective, B / N, S))
    assert plan.to_dict()["reference_epsilon"] == plan.reference.epsilon


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_bad_clipped_fraction_std_is_refused_by_name(value):
    with pytest.raises(ValueError, match="Invalid value for `clipped_fraction_std`"):
        make_plan(**RUN, noise_multiplier=3.0, clipped_fraction_std=value)
