"""`python -m tan_keras.train`: flag validation, the privacy plan, a fast default run.

Runs happen in-process through `train.cli` (one TensorFlow start-up for all
of them); two subprocess runs check the real exit status and stderr.
"""

import json
import subprocess
import sys

import pytest
from _helpers import NOISELESS, noiseless_statistics_released, refusal_line

from tan_keras import train
from tan_keras.privacy import accounting
from tan_keras.training import train_config, train_plan

# Every key of the metrics JSON (one flat object).
METRICS_KEYS = {
    "test_accuracy",
    "test_accuracy_ema",
    "test_accuracy_tta",
    "epsilon",
    "delta",
    "eta",
    "eps_tan",
    "noise_multiplier",
    "batch_size",
    "steps",
    "planned_steps",
    "augmult",
    "gradient_evaluations",
    "dataset",
    "model",
    "dataset_size",
    "simulation",
    "private",
    "reference_epsilon",
    "reference_eta",
    "reference_batch_size",
    "reference_noise_multiplier",
    "reference_dataset_size",
    "clipped_fraction_std",
    "accounted_noise_multiplier",
    "clipped_fraction_epsilon",
    "release",
    "noiseless_private_outputs",
    "training_set",
    "train_split_size",
    "tuning_examples",
    "tuning_split_seed",
    "compute_saving",
    "target_epsilon",
    "sampling_rate",
    "accountant",
    "model_dir",
    "wall_time_s",
}


def run_cli(args, capsys):
    """Runs the training program in-process; returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        train.cli(["tan_keras.train", *args])
    out = capsys.readouterr()
    return exit_info.value.code or 0, out.out, out.err


# ----------------------------------------------------------------- flag checks
# (flags, name the one-line error must contain). Each is refused before any
# work: nothing is written.
BAD_FLAGS = [
    (["--augmult=0"], "`augmult`"),
    (["--augmult=2.5"], "`augmult`"),
    (["--augment=none"], "`augmult`"),  # K = 4 identical views
    (["--augment=fancy"], "`augment`"),
    (["--augment=imagenet"], "`augment`"),  # needs RGB; digits are grey
    (["--batch_size=5000"], "`batch_size`"),  # B > N = 1437
    (["--batch_size=abc"], "`batch_size`"),
    (["--batch_size=0"], "`batch_size`"),
    (["--physical_batch_size=0"], "`physical_batch_size`"),
    (["--steps=0"], "`steps`"),
    (["--steps=1e400"], "`steps`"),
    (["--model=resnet"], "`model`"),
    (["--dataset=mnist"], "`dataset`"),
    (["--lr=0"], "`lr`"),
    (["--lr=nan"], "`lr`"),
    (["--momentum=1"], "`momentum`"),
    (["--ema_decay=1"], "`ema_decay`"),
    (["--examples_per_chunk=0"], "`examples_per_chunk`"),
    (["--examples_per_chunk=big"], "`examples_per_chunk`"),
    (["--l2_norm_clip=0"], "`l2_norm_clip`"),
    (["--delta=0"], "`delta`"),
    (["--delta=1.5"], "`delta`"),
    (["--target_eps=-1"], "`target_eps`"),
    (["--noise_multiplier=-1"], "`noise_multiplier`"),
    (["--noise_multiplier=1", "--target_eps=8"], "`target_eps`"),
    (["--ref_batch_size=1024"], "`ref_noise_multiplier`"),
    (["--ref_noise_multiplier=3"], "`ref_batch_size`"),
    (
        ["--ref_batch_size=1024", "--ref_noise_multiplier=3", "--noise_multiplier=1"],
        "`noise_multiplier`",
    ),
    (["--ref_batch_size=1024", "--ref_noise_multiplier=3", "--target_eps=8"], "`target_eps`"),
    (["--ref_batch_size=256", "--ref_noise_multiplier=3"], "`batch_size`"),  # B=512 > B_ref
    (
        ["--batch_size=64", "--ref_batch_size=2048", "--ref_noise_multiplier=3"],
        "`ref_batch_size`",
    ),  # B_ref > N
    (["--ref_batch_size=1024", "--ref_noise_multiplier=0"], "`ref_noise_multiplier`"),
    (["--accountant=gdp"], "`accountant`"),
    (["--checkpoint_every=0"], "`checkpoint_every`"),
    (["--eval_every=-5"], "`eval_every`"),
    (["--test_augmult=1"], "`test_augmult`"),
    (["--augment=none", "--augmult=1", "--test_augmult=4"], "`test_augmult`"),
    (["--seed=-1"], "`seed`"),
    (["--noise_seed=x"], "`noise_seed`"),
    (["--resume"], "`model_dir`"),  # --resume needs the run's directory
    (["--no_such_flag=1"], "no_such_flag"),  # absl's error, kept on one line
    (["--jit_compile=maybe"], "jit_compile"),
    (["--strategy=parameter_server"], "`strategy`"),
    (["--strategy=multiworker"], "`sampling_key_file`"),  # the shared key is required
    (["--sampling_key_file=/nonexistent"], "`sampling_key_file`"),
    (["--dry_run=maybe"], "dry_run"),
    (["--tpu=grpc://10.0.0.1:8470"], "`tpu`"),  # only with --strategy=tpu
    (["--tuning_examples=1437"], "`tuning_examples`"),  # leaves no private example
    (["--tuning_examples=0"], "`tuning_examples`"),
    (["--tuning_examples=10", "--tuning_split_seed=-1"], "`tuning_split_seed`"),
    (["--train_on=tuning"], "`train_on`"),  # no split to train on
    (["--tuning_split_seed=3"], "`tuning_split_seed`"),  # no split to seed
    (["--train_on=test"], "`train_on`"),
    (["--ref_dataset_size=5000"], "`ref_dataset_size`"),  # not a simulation
    (
        [
            "--tuning_examples=300",
            "--train_on=tuning",
            "--batch_size=64",
            "--ref_batch_size=1024",
            "--ref_noise_multiplier=3",
            "--ref_dataset_size=5000",
        ],
        "`ref_dataset_size`",
    ),  # the split already says the private run's N
    (
        ["--tuning_examples=1000", "--batch_size=512"],
        "`batch_size`",
    ),  # B > the private set's N = 437
    (["--release=some"], "`release`"),
]


@pytest.mark.parametrize("flags, name", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flag_is_refused_in_one_line_writing_nothing(
    flags, name, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # a default model_dir would land under ./runs
    run_dir, metrics = tmp_path / "run", tmp_path / "m.json"
    args = [*flags, f"--metrics_json={metrics}"]
    if "--resume" not in flags:
        args.append(f"--model_dir={run_dir}")
    code, out, err = run_cli(args, capsys)
    line = refusal_line(code, err)
    assert name in line, line
    assert "Privacy plan" not in out
    assert list(tmp_path.iterdir()) == []


def test_metrics_json_that_is_a_directory_is_refused(tmp_path, capsys):
    code, _, err = run_cli([f"--metrics_json={tmp_path}", f"--model_dir={tmp_path / 'r'}"], capsys)
    refusal_line(code, err, "metrics_json")
    assert list(tmp_path.iterdir()) == []


def test_unavailable_dataset_is_refused_with_instructions(tmp_path, capsys):
    code, _, err = run_cli(
        ["--dataset=cifar10", f"--data_dir={tmp_path / 'tfds'}", f"--model_dir={tmp_path / 'r'}"],
        capsys,
    )
    line = refusal_line(code, err)
    assert "'cifar10' is not prepared" in line and "tfds build cifar10" in line
    assert not (tmp_path / "r").exists()


def test_existing_run_without_resume_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "checkpoint").write_text("x")
    code, _, err = run_cli([f"--model_dir={run_dir}"], capsys)
    line = refusal_line(code, err, "model_dir")
    assert "--resume" in line
    assert sorted(p.name for p in run_dir.rglob("*")) == ["checkpoint", "checkpoints"]


def test_resume_without_checkpoint_is_refused(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    code, _, err = run_cli([f"--model_dir={tmp_path / 'run'}", "--resume"], capsys)
    line = refusal_line(code, err, "resume")
    assert "has none" in line
    assert list((tmp_path / "run").iterdir()) == []


@pytest.mark.parametrize(
    "flags, name",
    [(["--augmult=0"], "`augmult`"), (["--augment=imagenet"], "`augment`")],
)
def test_real_process_exits_2_with_one_line(flags, name, tmp_path):
    # --augmult=0 fails before TensorFlow loads, --augment=imagenet after.
    proc = subprocess.run(
        [sys.executable, "-m", "tan_keras.train", *flags, f"--model_dir={tmp_path / 'r'}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    line = refusal_line(proc.returncode, proc.stderr)
    assert name in line
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------- privacy plan
def _plan_numbers(out):
    """{label: value} from the printed plan's "  label   value ..." rows."""
    numbers = {}
    for line in out.splitlines():
        parts = line.split()
        for label in ("epsilon", "eta (TAN)", "reference epsilon", "reference eta", "eps_TAN"):
            if line.strip().startswith(label + " ") and len(parts) > len(label.split()):
                numbers[label] = parts[len(label.split())]
    return numbers


def test_default_plan_targets_epsilon_8_without_overshoot(capsys, tmp_path):
    code, out, _ = run_cli(["--dry_run", f"--model_dir={tmp_path / 'r'}"], capsys)
    assert code == 0
    numbers = _plan_numbers(out)
    assert 7.9 <= float(numbers["epsilon"]) <= 8.0
    assert "Private: this run guarantees" in out and "NOT PRIVATE" not in out
    assert not (tmp_path / "r").exists()


def test_simulation_plan_has_the_reference_eta_and_is_not_private(capsys, tmp_path):
    code, out, _ = run_cli(
        [
            "--dry_run",
            "--batch_size=64",
            "--ref_batch_size=1024",
            "--ref_noise_multiplier=3",
            f"--model_dir={tmp_path / 'r'}",
        ],
        capsys,
    )
    assert code == 0
    numbers = _plan_numbers(out)
    assert numbers["eta (TAN)"] == numbers["reference eta"]
    assert float(numbers["epsilon"]) > float(numbers["reference epsilon"])
    assert "noise_multiplier     0.1875" in out  # 3 * 64 / 1024
    assert "compute saving       16x" in out
    assert "NOT PRIVATE: this simulated run is NOT private" in out
    assert "Private: this run guarantees" not in out


def test_noise_seed_marks_the_run_not_private(capsys, tmp_path):
    code, out, _ = run_cli(["--dry_run", "--noise_seed=1", f"--model_dir={tmp_path}"], capsys)
    assert code == 0
    assert "NOT PRIVATE: --noise_seed" in out and "Private: this run" not in out


def test_noise_multiplier_turns_off_the_default_target():
    config = train_config.TrainConfig(noise_multiplier=2.0)
    assert config.target_eps is None and config.noise_mode == "noise_multiplier"
    plan = train_plan.plan_privacy(config, 1437)
    expected = accounting.compute_epsilon(2.0, 512 / 1437, 200, 1e-5)
    assert plan.epsilon == expected and plan.target_epsilon is None


def test_plan_without_noise_is_not_private():
    plan = train_plan.plan_privacy(train_config.TrainConfig(noise_multiplier=0), 1437)
    assert not plan.private and plan.to_dict()["epsilon"] is None
    assert "NOT PRIVATE: --noise_multiplier=0" in train_plan.format_plan(plan, "digits")


# ------------------------------------------------------------ a default run
def test_default_run_fast_variant_writes_all_metrics(capsys, tmp_path):
    # The default flags with 3 steps, plus test-time augmentation and
    # evaluation during training to cover them.
    run_dir = tmp_path / "run"
    code, out, err = run_cli(
        ["--steps=3", "--test_augmult=2", "--eval_every=2", f"--model_dir={run_dir}"], capsys
    )
    assert code == 0, err[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) == METRICS_KEYS
    assert metrics["steps"] == metrics["planned_steps"] == 3
    assert metrics["batch_size"] == 512 and metrics["augmult"] == 4
    assert metrics["gradient_evaluations"] == 3 * 512 * 4
    assert metrics["dataset"] == "digits" and metrics["dataset_size"] == 1437
    assert metrics["private"] is True and metrics["simulation"] is False
    assert 0 < metrics["epsilon"] <= 8.0
    assert metrics["epsilon"] == accounting.compute_epsilon(
        metrics["noise_multiplier"], 512 / 1437, 3, 1e-5
    )
    for key in ("test_accuracy", "test_accuracy_ema", "test_accuracy_tta"):
        assert 0.0 <= metrics[key] <= 1.0
    assert "val_accuracy" in out  # --eval_every
    saved = json.loads((run_dir / "train_config.json").read_text())
    assert saved["steps"] == 3 and saved["target_eps"] == 8.0
    assert (run_dir / "checkpoints" / "ckpt-3.index").exists()
    assert any((run_dir / "tensorboard").rglob("events.out.tfevents*"))
    assert not list(run_dir.glob("*.tmp-*"))  # the atomic write left no temp file
    # What it says it released without noise, it did (the power check of
    # release_test's scan): in the progress lines and TensorBoard.
    assert metrics["release"] == "all" and metrics["training_set"] == "all"
    assert set(metrics["noiseless_private_outputs"]) == set(NOISELESS)
    found = noiseless_statistics_released(run_dir, out + err)
    assert {"loss", "accuracy", "grad_norm", "clipped_fraction"} <= found["printed"]
    assert {"epoch_loss", "epoch_grad_norm", "epoch_clipped_fraction"} <= found["tensorboard"]
    assert "Not covered by epsilon: loss, accuracy" in out


def test_mirrored_strategy_runs_and_counts_global_steps(capsys, tmp_path):
    run_dir = tmp_path / "run"
    code, out, err = run_cli(
        [
            "--steps=2",
            "--strategy=mirrored",
            "--augmult=1",
            "--augment=none",
            f"--model_dir={run_dir}",
        ],
        capsys,
    )
    assert code == 0, err[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 2
    assert metrics["epsilon"] == accounting.compute_epsilon(
        metrics["noise_multiplier"], 512 / 1437, 2, 1e-5
    )


def test_physical_batch_size_is_a_multiple_of_the_replicas():
    from tan_keras.training import train_lib

    assert train_lib.physical_batch_size(None, 512, 1437, 4) % 4 == 0
    assert train_lib.physical_batch_size(None, 512, 1437, 1) == 585  # B + 4 std
    assert train_lib.physical_batch_size(64, 512, 1437, 8) == 64
    with pytest.raises(ValueError, match="`physical_batch_size`"):
        train_lib.physical_batch_size(66, 512, 1437, 4)
