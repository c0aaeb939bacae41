"""The experiment scripts' quick modes run and write sane CSV + PNG."""

import csv
import importlib.util
import json
import pathlib
import sys

import pytest

from tan_keras.privacy import tan

EXPERIMENTS = pathlib.Path(__file__).resolve().parent.parent / "experiments"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load(name):
    # The scripts import their sibling `_common` as a top-level module, as
    # they do when run as `python experiments/<name>.py`.
    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    spec = importlib.util.spec_from_file_location(f"experiment_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _assert_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_privacy_wall_quick(tmp_path):
    rows = _load("privacy_wall").main(["--quick", f"--output_dir={tmp_path}"])
    _assert_png(tmp_path / "privacy_wall.png")
    assert len(_rows(tmp_path / "privacy_wall.csv")) == len(rows) == 8
    eps_tan = tan.eps_tan(0.95, 8e-7)
    for steps in (1000, 10000):
        curve = {r["sigma"]: r["epsilon"] for r in rows if r["steps"] == steps}
        assert list(curve.values()) == sorted(curve.values(), reverse=True)  # the wall
        assert curve[5.0] == pytest.approx(eps_tan, rel=0.1)  # collapse to eps_TAN
        assert curve[0.5] > 3 * eps_tan
    # docs/tan-method.md, section 3: eta = 0.95, S = 1e4, delta = 8e-7. dp-accounting
    # >= 0.4.4 reports 35.0 where 0.4.3 reported 34.4 at sigma = 0.5: its
    # fractional orders 1.1-1.9 fail to converge there and are left out (a
    # looser, still valid bound); sigma = 2 is unchanged.
    wall = {r["sigma"]: r["epsilon"] for r in rows if r["steps"] == 10000}
    assert wall[0.5] == pytest.approx(35.02, abs=0.05)
    assert wall[2.0] == pytest.approx(8.04, abs=0.01)


def test_rdp_ratio_quick(tmp_path):
    rows = _load("rdp_ratio").main(["--quick", f"--output_dir={tmp_path}"])
    _assert_png(tmp_path / "rdp_ratio.png")
    ratio = {(r["sigma"], r["alpha"]): r["ratio"] for r in rows}
    assert len(_rows(tmp_path / "rdp_ratio.csv")) == len(ratio) == 9
    assert 1.0 <= ratio[(3.0, 2.0)] < 1.1 and ratio[(3.0, 32.0)] < 1.5  # ~ alpha eta_step^2
    assert ratio[(0.5, 8.0)] > 100 and ratio[(1.0, 32.0)] > 100  # the approximation breaks


def test_batch_scaling_quick(tmp_path):
    fit, rows = _load("batch_scaling").main(["--quick", f"--output_dir={tmp_path}"])
    _assert_png(tmp_path / "batch_scaling.png")
    assert [r["batch_size"] for r in rows] == [8, 16, 32, 64, 128]
    assert [r["used_in_fit"] for r in rows] == [True] * 3 + [False] * 2
    held_out = _rows(tmp_path / "batch_scaling.csv")[3:]
    assert all(r["covered"] in ("True", "False") for r in held_out)
    assert {r["noise_multiplier"] for r in rows} == {5.0 * b / 128 for b in (8, 16, 32, 64, 128)}
    saved = json.loads((tmp_path / "batch_scaling_fit.json").read_text())
    assert saved["fit"]["num_points"] == 3 and saved["fit"]["slope"] == pytest.approx(fit.slope)
    assert len(_rows(tmp_path / "batch_scaling_runs.csv")) == 5


def test_ranking_quick(tmp_path):
    rows, summary = _load("ranking").main(["--quick", f"--output_dir={tmp_path}"])
    _assert_png(tmp_path / "ranking.png")
    assert [r["config"] for r in rows] == ["lr=1", "lr=4", "lr=16"]
    assert sorted(r["rank_B8"] for r in rows) == [1, 2, 3]
    # nan only if every config tied at one batch size (2 steps: near chance).
    for name in ("spearman", "kendall_tau"):
        assert summary[name] == pytest.approx(summary[f"scipy_{name}"], abs=1e-12, nan_ok=True)
    assert len(_rows(tmp_path / "ranking.csv")) == 3
