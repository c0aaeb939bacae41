"""The DP step benchmark runs end to end and writes its rows."""

import json
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "dp_step_benchmark.py"


def _run(*args):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=False
    )


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
    for bad in ("--repeats=0", "--examples_per_chunk=lots", "--methods=opacus"):
        result = _run(bad)
        assert result.returncode == 2, bad
        assert bad.split("=")[0] in result.stderr, result.stderr
