"""`python -m tan_keras.privacy`: reports, plans, and one-line errors."""

import json
import os
import subprocess
import sys

import _forked_cli
import pytest
from _helpers import refusal_line

from tan_keras import _cli
from tan_keras.privacy import cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CIFAR_FLAGS = [
    "--dataset_size=50000",
    "--batch_size=4096",
    "--noise_multiplier=3",
    "--steps=2500",
    "--delta=1e-5",
]
PLAN_FLAGS = [
    "--dataset_size=50000",
    "--ref_batch_size=4096",
    "--ref_noise_multiplier=3",
    "--steps=2500",
    "--delta=1e-5",
    "--batch_size=256",
]
RUN_KEYS = {
    "epsilon",
    "eta",
    "eps_tan",
    "noise_multiplier",
    "sampling_rate",
    "steps",
    "delta",
    "overcharged",
}


def _start(*flags):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-m", "tan_keras.privacy", *flags],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process):
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _run(*flags):
    return _finish(_start(*flags))


def _strict_json(text):
    # json.loads accepts Infinity and NaN by default; the CLI must not emit them.
    def reject(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=reject)


# --- Through a subprocess, as a user runs it ---------------------------------


def test_json_report_of_a_run():
    result = _run(*CIFAR_FLAGS, "--json")
    assert result.returncode == 0, result.stderr
    data = _strict_json(result.stdout)
    assert RUN_KEYS <= set(data)
    assert data["epsilon"] == pytest.approx(7.10, abs=0.02)
    assert data["eta"] == pytest.approx(0.965, abs=5e-4)
    assert data["eps_tan"] == pytest.approx(7.48, abs=0.01)
    assert data["sampling_rate"] == 0.08192 and data["steps"] == 2500
    assert data["overcharged"] is False


def test_plan_prints_what_to_launch():
    # The acceptance command of the issue.
    result = _run(*PLAN_FLAGS)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "0.1875" in out
    assert "NOT PRIVATE" in out
    assert "7.10" in out
    assert "16x" in out
    assert "Launch now: batch_size=256, noise_multiplier=0.1875, steps=2500." in out


def test_plan_json_has_both_runs():
    result = _run(*PLAN_FLAGS, "--json", "--augmult=16")
    assert result.returncode == 0, result.stderr
    data = _strict_json(result.stdout)
    assert RUN_KEYS <= set(data)
    assert data["mode"] == "plan"
    sim, ref = data["simulation"], data["reference"]
    assert sim["noise_multiplier"] == 0.1875 and sim["private"] is False
    assert ref["private"] is True
    # Top-level keys describe the reference run: the epsilon to claim.
    assert data["epsilon"] == ref["epsilon"] == pytest.approx(7.10, abs=0.02)
    assert data["compute_saving"] == 16
    assert sim["gradient_evaluations"] == 2500 * 256 * 16


def test_target_eps_solves_for_sigma():
    flags = [f for f in CIFAR_FLAGS if not f.startswith("--noise_multiplier")]
    result = _run(*flags, "--target_eps=8", "--json")
    assert result.returncode == 0, result.stderr
    data = _strict_json(result.stdout)
    assert data["mode"] == "calibrate"
    assert 7.99 <= data["epsilon"] <= 8.0
    assert 2.0 < data["noise_multiplier"] < 3.0


def test_the_cli_does_not_import_tensorflow():
    # Accounting must stay light: a privacy question should not pay
    # TensorFlow's start-up (or its memory) on the 2-core CI machine.
    code = "import sys, tan_keras.privacy.__main__; print('tensorflow' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


BASE = ["--dataset_size=50000", "--batch_size=4096", "--steps=2500", "--delta=1e-5"]


def _replace(flags, **values):
    """`flags` with --name=value set (value None: removed)."""
    kept = [f for f in flags if f.split("=")[0][2:] not in values]
    return kept + [f"--{k}={v}" for k, v in values.items() if v is not None]


BAD_INPUTS = [
    ("negative-sigma", _replace(BASE, noise_multiplier=-1), "noise_multiplier"),
    ("batch-over-dataset", _replace(BASE, noise_multiplier=3, batch_size=60000), "batch_size"),
    ("delta-zero", _replace(BASE, noise_multiplier=3, delta=0), "delta"),
    ("delta-one", _replace(BASE, noise_multiplier=3, delta=1), "delta"),
    ("delta-negative", _replace(BASE, noise_multiplier=3, delta=-1e-5), "delta"),
    ("delta-missing", _replace(BASE, noise_multiplier=3, delta=None), "delta"),
    ("steps-not-integer", _replace(BASE, noise_multiplier=3, steps=2500.5), "steps"),
    ("steps-not-a-number", _replace(BASE, noise_multiplier=3, steps="abc"), "steps"),
    ("steps-and-epochs", _replace(BASE, noise_multiplier=3, epochs=10), "epochs"),
    ("target-and-sigma", _replace(BASE, noise_multiplier=3, target_eps=8), "target_eps"),
    (
        "unreachable-target",
        ["--dataset_size=1000", "--batch_size=1000", "--steps=1000000"]
        + ["--delta=1e-5", "--target_eps=0.001"],
        "target_eps",
    ),
    ("only-ref-batch", _replace(PLAN_FLAGS, ref_noise_multiplier=None), "ref_noise_multiplier"),
    ("only-ref-sigma", _replace(PLAN_FLAGS, ref_batch_size=None), "ref_batch_size"),
    ("plan-batch-too-big", _replace(PLAN_FLAGS, batch_size=8192), "batch_size"),
    ("unknown-accountant", _replace(BASE, noise_multiplier=3, accountant="moments"), "accountant"),
    ("augmult-zero", _replace(BASE, noise_multiplier=3, augmult=0), "augmult"),
    ("unknown-flag", _replace(BASE, noise_multiplier=3, noise=3), "noise"),
    (
        "clipped-fraction-std-zero",
        _replace(BASE, noise_multiplier=3, clipped_fraction_std=0),
        "clipped_fraction_std",
    ),
]


@pytest.fixture(scope="module")
def bad_input_results():
    # One interpreter's imports, a forked run per input (`_forked_cli.py`).
    results = _forked_cli.run_many(
        "tan_keras.privacy",
        [flags for _, flags, _ in BAD_INPUTS],
        warm=["absl.app", "tan_keras.privacy.cli"],
    )
    return {case: result for (case, _, _), result in zip(BAD_INPUTS, results)}


@pytest.mark.parametrize("case, name", [(c[0], c[2]) for c in BAD_INPUTS])
def test_bad_input_exits_with_one_line_naming_the_flag(bad_input_results, case, name):
    result = bad_input_results[case]
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    line = refusal_line(result.returncode, result.stderr)
    if name == "noise":  # absl's own parse error, reworded to one line
        assert "Unknown command line flag 'noise'" in line
    else:
        assert f"Invalid value for `{name}`: expected " in line
        assert f"Received: {name}=" in line


# --- In process: the pure functions --------------------------------------------


def _report(**overrides):
    args = dict(dataset_size=50000, batch_size=4096, delta=1e-5, steps=2500)
    return cli.report(**{**args, **overrides})


def test_a_noisy_clipped_fraction_is_accounted_with_the_run():
    from tan_keras.privacy import accounting

    plain = _report(noise_multiplier=3)
    assert plain["clipped_fraction_std"] is None and plain["accounted_noise_multiplier"] is None
    both = _report(noise_multiplier=3, clipped_fraction_std=0.05)
    effective = accounting.effective_noise_multiplier(3, 0.05 * 4096)
    assert both["accounted_noise_multiplier"] == pytest.approx(effective, rel=1e-12)
    q = 4096 / 50000
    assert both["epsilon"] == pytest.approx(
        accounting.compute_epsilon(effective, q, 2500, 1e-5), rel=1e-9
    )
    assert both["epsilon"] > plain["epsilon"]
    assert "clipped fraction   released with noise std 0.05" in cli.format_report(both)
    # A plan reports the reference run's count (noise 0.05 * B_ref), whose
    # epsilon is the reference's in the plan.
    plan = _report(
        batch_size=256, ref_batch_size=4096, ref_noise_multiplier=3, clipped_fraction_std=0.05
    )
    assert plan["accounted_noise_multiplier"] == pytest.approx(effective, rel=1e-12)
    assert plan["epsilon"] == plan["reference"]["epsilon"] == pytest.approx(both["epsilon"])
    assert "Reference run: clipped fraction" in cli.format_report(plan)


def test_epochs_and_steps_give_the_same_report():
    by_steps = _report(noise_multiplier=3)
    by_epochs = _report(noise_multiplier=3, steps=None, epochs=204.8)
    assert by_epochs == by_steps


def test_plan_epochs_count_passes_of_the_reference_run():
    plan = cli.report(
        dataset_size=50000,
        batch_size=256,
        delta=1e-5,
        epochs=204.8,
        ref_batch_size=4096,
        ref_noise_multiplier=3,
    )
    assert plan["steps"] == 2500


def test_pld_report_is_tighter():
    rdp = _report(noise_multiplier=3)
    pld = _report(noise_multiplier=3, accountant="pld")
    assert pld["accountant"] == "pld"
    assert pld["epsilon"] < rdp["epsilon"]
    assert pld["eta"] == rdp["eta"]


def test_human_report_shows_the_verdict():
    text = cli.format_report(_report(noise_multiplier=3))
    assert "epsilon            7.10" in text
    assert "Not overcharged" in text
    text = cli.format_report(_report(noise_multiplier=0.4, batch_size=512))
    assert "Overcharged" in text and "no meaningful epsilon" in text


def test_delta_not_below_one_over_n_is_flagged():
    assert _report(noise_multiplier=3)["warnings"] == []
    report = _report(noise_multiplier=3, dataset_size=50000, delta=1e-4)
    assert len(report["warnings"]) == 1 and "1/dataset_size" in report["warnings"][0]


def test_to_json_never_emits_infinity():
    text = cli.to_json({"epsilon": float("inf"), "runs": [{"x": float("nan")}]})
    assert _strict_json(text) == {"epsilon": None, "runs": [{"x": None}]}


@pytest.mark.parametrize(
    "text, value",
    [(None, None), ("2500", 2500), ("1e-5", 1e-5), ("2500.5", 2500.5), ("abc", "abc")],
)
def test_parse_number(text, value):
    assert _cli.parse_number(text) == value
