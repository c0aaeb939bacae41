"""The benchmarks run end to end, print their baselines and refuse bad arguments."""

import json
import pathlib
import subprocess
import sys

import _forked_cli

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "dp_step_benchmark.py"
OPS_SCRIPT = BENCHMARKS / "per_example_ops.py"
CALIBRATION_SCRIPT = BENCHMARKS / "calibration_benchmark.py"


def _script(script, *args, timeout=300):
    """Runs a benchmark script with `args`; its completed process."""
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )


def _run(*args):
    return _script(SCRIPT.name, *args)


def test_benchmark_writes_one_row_per_method_with_ratios(tmp_path):
    out = tmp_path / "bench.json"
    result = _run(
        "--models=small_cnn",
        "--batch_sizes=8",
        "--augmults=1",
        "--methods=plain,dp_vmap",
        "--steps=1",
        "--warmup=1",
        "--examples_per_chunk=3",
        f"--json={out}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["plain", "dp_vmap"]
    for row in rows:
        assert row["examples_per_s"] > 0 and row["peak_rss_mb"] > 0
    assert rows[0]["slowdown_vs_plain"] == 1.0
    assert rows[1]["slowdown_vs_plain"] > 0
    assert "dp_vmap" in result.stdout


def test_benchmark_refuses_bad_arguments_before_running():
    # One interpreter's imports (Keras, TensorFlow), a forked run per input.
    bad = [
        "--repeats=0",
        "--steps=0",
        "--warmup=-1",
        "--batch_sizes=64,0",
        "--augmults=four",
        "--examples_per_chunk=lots",
        "--examples_per_chunk=0",
        "--methods=opacus",
    ]
    results = _forked_cli.run_many(str(SCRIPT), [[flag] for flag in bad], warm=["zoo", "_bench"])
    for flag, result in zip(bad, results):
        assert result.returncode == 2, (flag, result.stderr[-2000:])
        assert flag.split("=")[0] in result.stderr, result.stderr
    result = _script(OPS_SCRIPT.name, "--sections=clip,gpu")
    assert result.returncode == 2 and "--sections" in result.stderr
    for flag in ("--steps=0", "--warmup=0"):  # not replaced by the defaults
        result = _script("device_check.py", "--smoke", flag)
        assert result.returncode == 2 and "--steps and --warmup" in result.stderr, flag


def test_per_example_ops_benchmark_prints_ratios_against_each_baseline():
    result = _script(OPS_SCRIPT.name, "--batch=2", "--sections=clip,conv", "--steps=1")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    titles = [line for line in lines if not line.startswith(" ")]
    assert len(titles) == 4  # clip, and conv at three stage shapes
    for title in titles:
        first = lines[lines.index(title) + 1]
        assert first.rstrip().endswith("1.00x"), first


def test_calibration_benchmark_compares_both_searches_within_budget():
    result = _script(CALIBRATION_SCRIPT.name, "--cases=1")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("digits")]
    assert [row[2] for row in rows] == ["tan_keras", "dp-accounting"]
    assert all(row[5] == "yes" for row in rows)  # neither overshoots the budget
    assert "dp-accounting / tan_keras time" in result.stdout


def test_embedding_ghost_benchmark_prints_ratios_against_the_vectorized_step():
    result = _script(
        "embedding_ghost_benchmark.py",
        "--vocab=300",
        "--dim=8",
        "--length=4",
        "--batch=4",
        "--steps=1",
        "--warmup=1",
        "--repeats=1",
        "--methods=dp_vmap,dp_ghost",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert "dp_vmap" in rows and "dp_ghost" in rows
    assert "embedding" in rows["dp_ghost"]  # the table took the ghost route


def test_device_check_runs_in_smoke_mode_and_its_checks_pass(tmp_path):
    out_json = tmp_path / "device.json"
    result = _script("device_check.py", "--smoke", f"--json={out_json}", timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(out_json.read_text())
    assert {row["precision"] for row in report["steps"]} == {"float32", "mixed_bfloat16"}
    assert all(row["route"] in ("layerwise", "ghost", "vectorized") for row in report["steps"])
    assert sorted(c["check"] for c in report["checks"]) == ["noise", "noise"] + ["sensitivity"] * 2
    assert all(c["ok"] for c in report["checks"])
    assert "| model | B | K | precision |" in result.stdout


def test_imagenet_input_benchmark_prints_views_per_core(tmp_path):
    result = _script(
        "imagenet_input_benchmark.py",
        f"--data_dir={tmp_path / 'tfds'}",
        "--examples=12",
        "--cores=1",
        "--augmult=2",
        "--batch=4",
        "--physical_batch=4",
        "--micro_batches=2",
        "--warmup=1",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 1 |")]
    assert len(rows) == 1 and rows[0].rstrip().endswith("1.00x |")
