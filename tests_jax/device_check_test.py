"""The JAX accelerator check (`benchmarks/jax_device_check.py`) in smoke mode, with power checks."""

import os
import sys

from tan_keras.jax_dp import clipped_sum

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
)

import jax_device_check  # noqa: E402


def test_the_smoke_run_times_both_steps_and_its_checks_pass(tmp_path, capsys):
    # mixed_bfloat16 only (the float32 noise and sensitivity of the step are
    # noise_test's and dp_step_test's; the power checks below run float32).
    json_path = f"--json={tmp_path / 'check.json'}"
    assert jax_device_check.main(["--smoke", "--precisions=mixed_bfloat16", json_path]) == 0
    out = capsys.readouterr().out
    assert "| small_cnn | 8 | 2 | mixed_bfloat16 |" in out
    assert out.count(": ok") == 2


def test_the_checks_reject_too_much_noise_and_an_unclipped_example(monkeypatch):
    # Power checks: 10% more noise fails the noise check; a step that does
    # not clip fails the sensitivity check.
    add_noise = clipped_sum.add_noise
    monkeypatch.setattr(
        clipped_sum, "add_noise", lambda grads, key, std: add_noise(grads, key, 1.1 * std)
    )
    assert not jax_device_check.check_noise("float32")["ok"]
    monkeypatch.undo()
    local = clipped_sum.local_clipped_sum

    def unclipped(loss, params, examples, keep, clip, *args, **kwargs):
        return local(loss, params, examples, keep, 1e9, *args, **kwargs)

    monkeypatch.setattr(clipped_sum, "local_clipped_sum", unclipped)
    assert not jax_device_check.check_sensitivity("float32")["ok"]
