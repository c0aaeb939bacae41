"""The simulated hyper-parameter search: grid, resumable runs, results, CLI."""

import csv
import dataclasses
import json
import math
import os
import re
import shlex
import subprocess
import sys

import pytest
from _helpers import refusal_line

from tan_keras.training import search_lib, search_results

REF_B, SIGMA_REF, STEPS = 256, 4.0, 2
GRID = "lr=1,2;augmult=1,2"
TRAIN = "python -m tan_keras.train "


def _spec(tmp_path, batch_sizes=(16,), seeds=(0,), grid=GRID, dataset="digits", **kwargs):
    return search_lib.SearchSpec(
        ref_batch_size=REF_B,
        ref_noise_multiplier=SIGMA_REF,
        steps=STEPS,
        batch_sizes=batch_sizes,
        grid=search_lib.parse_grid([grid]),
        seeds=seeds,
        output_dir=str(tmp_path),
        dataset=dataset,
        **kwargs,
    )


def _flag(argv, name):
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    return values[-1] if values else None


class FakeRunner:
    """Stands in for the training program: writes a metrics.json, records calls.

    Accuracy = 0.5 + 0.1 * lr - 0.01 * log2(B) + 0.001 * seed, so lr=2 wins
    at every batch size and the law's slope is 0.01 per doubling.
    """

    def __init__(self):
        self.calls = []

    def __call__(self, config, name):
        self.calls.append((config, name))
        if config.dry_run:
            return
        b = config.batch_size
        acc = 0.5 + 0.1 * config.lr - 0.01 * math.log2(b) + 0.001 * config.seed
        metrics = {
            "batch_size": b,
            "steps": config.steps,
            "augmult": config.augmult,
            "noise_multiplier": SIGMA_REF * b / REF_B,
            "dataset_size": 1437,
            "delta": config.delta,
            "accountant": config.accountant,
            "test_accuracy": acc - 0.05,
            "test_accuracy_ema": acc,
        }
        os.makedirs(config.model_dir, exist_ok=True)
        with open(os.path.join(config.model_dir, "train_config.json"), "w") as f:
            json.dump(config.to_dict(), f)
        with open(os.path.join(config.model_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f)


@pytest.mark.parametrize(
    "specs, axes",
    [
        (["lr=1,2;augmult=1,2"], (("lr", ("1", "2")), ("augmult", ("1", "2")))),
        (["lr=1,2", "--ema_decay=0.9,0.99"], (("lr", ("1", "2")), ("ema_decay", ("0.9", "0.99")))),
        (["lr = 1e-3 ;"], (("lr", ("1e-3",)),)),
    ],
)
def test_parse_grid(specs, axes):
    assert search_lib.parse_grid(specs) == axes


@pytest.mark.parametrize(
    "specs, why",
    [
        ([], "at least one axis"),
        (["lr"], "axes like"),
        (["lr="], "axes like"),
        (["Lr=1"], "axes like"),
        (["batch_size=16,32"], "axes over flags the search does not set"),
        (["lr=1;lr=2"], "each flag in one axis only"),
        (["lr=1,1"], "distinct values"),
        (["model=../x"], "distinct values made of letters"),
        (["no_such_flag=1"], "axes over tan_keras.train flags"),
    ],
)
def test_parse_grid_rejects(specs, why):
    with pytest.raises(ValueError, match=f"Invalid value for `grid`: expected {why}"):
        search_lib.parse_grid(specs)


@pytest.mark.parametrize(
    "axis, name", [("lr=0", "lr"), ("augmult=2.5", "augmult"), ("model=resnet", "model")]
)
def test_parse_grid_checks_values_as_the_program_does(axis, name):
    # Typed at parse time: a value the program would refuse fails before any run.
    with pytest.raises(ValueError, match=f"Invalid value for `{name}`"):
        search_lib.parse_grid([axis])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"batch_sizes": (512,)}, "batch_size"),
        ({"batch_sizes": ()}, "batch_size"),
        ({"batch_sizes": (16, 16)}, "batch_size"),
        ({"seeds": (0, 0)}, "seeds"),
        ({"seeds": (-1,)}, "seeds"),
        ({"train_flags": ("--steps=5",)}, "train_flags"),
        ({"train_flags": ("--lr=5",)}, "train_flags"),
        ({"train_flags": ("model=x",)}, "train_flags"),
        ({"train_flags": ("--model=resnet",)}, "train_flags"),
        ({"train_flags": ("--no_such_flag=1",)}, "train_flags"),
        ({"confidence": 1.0}, "confidence"),
        ({"dataset": "mnist"}, "dataset"),
    ],
)
def test_spec_rejects(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=f"Invalid value for `{name}`"):
        _spec(tmp_path, **kwargs)


def test_argv_of_simulation_and_final_run(tmp_path):
    spec = _spec(tmp_path, batch_sizes=(32, 16), train_flags=("--model=small_cnn",))
    assert spec.batch_sizes == (16, 32) and spec.rank_batch_size == 32
    assert spec.configs == [
        (("lr", "1"), ("augmult", "1")),
        (("lr", "1"), ("augmult", "2")),
        (("lr", "2"), ("augmult", "1")),
        (("lr", "2"), ("augmult", "2")),
    ]
    config = spec.configs[1]
    sim = search_lib.simulation_argv(spec, config, 16, 3)
    assert sim[0] == "--model=small_cnn"  # first, so the search's flags win
    assert {"--lr=1", "--augmult=2", "--batch_size=16", "--steps=2", "--seed=3"} <= set(sim)
    assert {"--ref_batch_size=256", "--ref_noise_multiplier=4"} <= set(sim)
    assert _flag(sim, "model_dir") == str(tmp_path / "runs" / "lr=1,augmult=2,B=16,seed=3")
    final = search_lib.final_argv(spec, config)
    assert {"--batch_size=256", "--noise_multiplier=4", "--steps=2", "--lr=1"} <= set(final)
    assert not any("ref_" in a for a in final)
    assert search_lib.command_line(["--train_flags=a b"]) == TRAIN + "'--train_flags=a b'"
    # The noise multiplier is printed exactly (repr), never rounded to 6 digits.
    odd = dataclasses.replace(spec, ref_noise_multiplier=5.3012345678)
    assert "--noise_multiplier=5.3012345678" in search_lib.final_argv(odd, config)


def test_search_ranks_fits_counts_and_resumes(tmp_path):
    spec = _spec(tmp_path, batch_sizes=(16, 32), seeds=(0, 1), grid="lr=1,2,3;augmult=1,2")
    runner = FakeRunner()
    records, trained, skipped = search_lib.run_search(spec, runner, log=lambda _: None)
    assert (trained, skipped, len(records)) == (24, 0, 24)
    summary = search_results.summarize(spec, records)
    ranking = summary["ranking"]
    assert [r["config"]["lr"] for r in ranking[:2]] == ["3", "3"]
    assert ranking[0]["num_seeds"] == 2 and ranking[0]["std"] == pytest.approx(0.001 / 2**0.5)
    assert ranking[0]["mean"] == pytest.approx(0.8 - 0.05 + 0.0005)
    assert summary["rank_correlation"]["spearman"] == pytest.approx(1.0)
    # The fake law: slope 0.01 per doubling, exact up to the seed offsets.
    pred = summary["prediction"]
    assert pred["fit"]["slope"] == pytest.approx(0.01, abs=1e-9)
    assert pred["at_reference"]["accuracy"] == pytest.approx(0.8 - 0.08 + 0.0005, abs=1e-9)
    ledger = summary["ledger"]
    assert ledger["search_evaluations"] == STEPS * (16 + 32) * 2 * 3 * (1 + 2)
    assert ledger["saving"] == pytest.approx(REF_B * 2 / (16 + 32))
    assert ledger["final_run_evaluations"] == STEPS * REF_B * int(summary["best"]["augmult"])
    assert summary["plan"]["reference"]["noise_multiplier"] == SIGMA_REF
    assert summary["plan"]["simulation"]["noise_multiplier"] == SIGMA_REF * 32 / REF_B
    assert summary["final_command"].startswith(TRAIN)
    assert "--lr=3" in summary["final_command"]

    csv_path, json_path = search_results.write_results(spec, records, summary)
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24 and rows[0]["lr"] == "1" and rows[0]["batch_size"] == "16"
    assert list(rows[0]).count("augmult") == 1
    saved = json.load(open(json_path))
    assert saved["search"]["grid"] == {"lr": ["1", "2", "3"], "augmult": ["1", "2"]}
    assert saved["ledger"] == ledger and len(saved["runs"]) == 24
    report = search_results.format_report(summary, trained, skipped)
    assert "24 trained, 0 skipped" in report and summary["final_command"] in report
    assert "Spearman 1.000" in report and "predicted at B_ref=256" in report

    again = FakeRunner()
    records2, trained, skipped = search_lib.run_search(spec, again, log=lambda _: None)
    assert (trained, skipped, again.calls) == (0, 24, [])
    assert [r["test_accuracy_ema"] for r in records2] == [r["test_accuracy_ema"] for r in records]


def test_unfinished_runs_are_resumed_or_restarted(tmp_path):
    spec = _spec(tmp_path, grid="lr=1,2")
    with_ckpt = tmp_path / "runs" / search_lib.run_name((("lr", "1"),), 16, 0)
    (with_ckpt / "checkpoints").mkdir(parents=True)
    (with_ckpt / "checkpoints" / "ckpt-1.index").write_text("")
    no_ckpt = tmp_path / "runs" / search_lib.run_name((("lr", "2"),), 16, 0)
    no_ckpt.mkdir(parents=True)
    (no_ckpt / "events.out.tfevents.stale").write_text("")
    runner = FakeRunner()
    search_lib.run_search(spec, runner, log=lambda _: None)
    (config1, _), (config2, _) = runner.calls
    assert config1.resume and not config2.resume
    assert not (no_ckpt / "events.out.tfevents.stale").exists()  # cleared before restarting


def test_missing_metric_and_silent_runner_are_errors(tmp_path):
    spec = _spec(tmp_path, grid="lr=1", metric="val_loss")
    with pytest.raises(ValueError, match="Invalid value for `metric`"):
        search_lib.run_search(spec, FakeRunner(), log=lambda _: None)
    with pytest.raises(RuntimeError, match="wrote no"):
        search_lib.run_search(_spec(tmp_path / "b", grid="lr=1"), lambda c, n: None, print)


def _run_search_cli(args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "tan_keras.search", *args],
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )


@pytest.mark.parametrize(
    "args, name",
    [
        (
            ["--steps=2", "--batch_size=16", "--ref_noise_multiplier=4", "--grid=lr=1"],
            "ref_batch_size",
        ),
        (
            [
                "--ref_batch_size=256",
                "--steps=2",
                "--batch_size=16",
                "--ref_noise_multiplier=4",
                "--grid=seed=1,2",
            ],
            "grid",
        ),
        (
            [
                "--ref_batch_size=256",
                "--steps=2.5",
                "--batch_size=16",
                "--ref_noise_multiplier=4",
                "--grid=lr=1",
            ],
            "steps",
        ),
        (
            [
                "--ref_batch_size=256",
                "--steps=2",
                "--batch_size=512",
                "--ref_noise_multiplier=4",
                "--grid=lr=1",
            ],
            "batch_size",
        ),
    ],
)
def test_cli_refuses_bad_flags_in_one_line(args, name, tmp_path):
    result = _run_search_cli([*args, f"--output_dir={tmp_path}"])
    line = refusal_line(result.returncode, result.stderr, name)
    assert line.startswith(f"error: Invalid value for `{name}`")
    assert not os.listdir(tmp_path)


CLI_ARGS = [
    f"--ref_batch_size={REF_B}",
    f"--ref_noise_multiplier={SIGMA_REF:g}",
    f"--steps={STEPS}",
    "--batch_size=16",
    f"--grid={GRID}",
    "--dataset=digits",
]


def test_search_on_digits_end_to_end_then_cli_skips_finished_runs(tmp_path, capsys):
    from tan_keras import train

    # First invocation in process (TensorFlow is loaded once): 4 tiny runs.
    spec = _spec(tmp_path)
    records, trained, skipped = search_lib.run_search(spec, search_lib.in_process_runner())
    assert (trained, skipped) == (4, 0)
    assert all(r["simulation"] and not r["private"] for r in records)
    assert {r["noise_multiplier"] for r in records} == {SIGMA_REF * 16 / REF_B}
    summary = search_results.summarize(spec, records)
    metrics = sorted((tmp_path / "runs").glob("*/metrics.json"))
    mtimes = [p.stat().st_mtime_ns for p in metrics]
    assert len(metrics) == 4

    # The printed final command, as a shell would split it, is accepted by
    # tan_keras.train (--dry_run: flags validated, privacy plan printed).
    command = summary["final_command"]
    assert command.startswith(TRAIN)
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        train.cli(["tan_keras.train", *shlex.split(command[len(TRAIN) :]), "--dry_run"])
    assert (done.value.code or 0) == 0
    plan = capsys.readouterr().out
    assert re.search(rf"batch_size B\s+{REF_B}\b", plan) and "NOT PRIVATE" not in plan

    # Second invocation, through the real CLI: nothing retrains.
    result = _run_search_cli([*CLI_ARGS, f"--output_dir={tmp_path}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Runs: 0 trained, 4 skipped" in result.stdout
    assert result.stdout.count("skipped (finished)") == 4
    assert [p.stat().st_mtime_ns for p in metrics] == mtimes
    assert command in result.stdout.splitlines()
    assert "final command checked" in result.stdout
    # Tuned on the private set: the output says the choice is not covered.
    assert "Tuning on the private set" in result.stdout
    assert "NOT COVERED: the simulations trained on the same 1437 digits examples" in result.stdout
    assert json.loads((tmp_path / "results.json").read_text())["coverage"]["mode"] == "private_set"
    assert (tmp_path / "results.csv").exists() and (tmp_path / "results.json").exists()
