"""Each dataset's recipe: what `--dataset=X` alone runs, and the dry run without data.

`python -m tan_keras.train --dataset=imagenet2012 --target_eps=8` is the
mission's command: it must take the TAN paper's ImageNet recipe for every
setting it does not give (not the digits defaults), print the privacy plan
without the data being present, and fail fast without data otherwise.
"""

import os

import pytest
from absl import flags
from flags_test import FLAGS_DIR, IMAGENET_N
from train_test import run_cli

from tan_keras import train
from tan_keras.data import datasets
from tan_keras.training import train_config
from tan_keras.training.train_config import RECIPES, TrainConfig


def _parsed(*args):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["tan_keras.train", *args])
    try:
        return train.config_from_flags()
    finally:
        flags.FLAGS.unparse_flags()


@pytest.mark.parametrize("dataset", sorted(RECIPES))
def test_a_dataset_alone_takes_its_recipe(dataset):
    config = TrainConfig(dataset=dataset)
    for name, value in RECIPES[dataset].items():
        assert getattr(config, name) == value, name
    assert config.delta == train_config.DEFAULT_DELTA[dataset]
    # The command line means the same as the library.
    assert _parsed(f"--dataset={dataset}") == config


def test_the_imagenet_recipe_is_the_papers_run():
    config = TrainConfig(dataset="imagenet2012", target_eps=8)
    assert (config.model, config.batch_size, config.steps, config.augmult) == (
        "nf_resnet50",
        32768,
        18000,
        8,
    )
    assert (config.lr, config.momentum, config.ema_decay, config.delta) == (32.0, 0.0, 0.999, 8e-7)
    assert config.augment == "imagenet"


@pytest.mark.parametrize(
    "flagfile, dataset",
    [("imagenet_nfresnet50.cfg", "imagenet2012"), ("cifar10_wrn16_4.cfg", "cifar10")],
)
def test_each_papers_flagfile_is_its_datasets_recipe(flagfile, dataset):
    # Power check of the recipes: the flagfiles were checked against the
    # paper (flags_test.py); a recipe that drifted from them fails here.
    from_file = _parsed(f"--flagfile={FLAGS_DIR / flagfile}")
    recipe = TrainConfig(dataset=dataset, noise_multiplier=from_file.noise_multiplier)
    for name in RECIPES[dataset]:
        assert getattr(recipe, name) == getattr(from_file, name), name
    assert recipe.delta == from_file.delta and recipe.augment == from_file.augment


def test_given_settings_win_over_the_recipe():
    config = _parsed("--dataset=imagenet2012", "--batch_size=4096", "--ema_decay=none")
    assert config.batch_size == 4096 and config.ema_decay is None
    assert config.model == "nf_resnet50" and config.steps == 18000
    # "auto" is a physical batch size of its own, not the recipe's 32.
    assert (
        _parsed("--dataset=imagenet2012", "--physical_batch_size=auto").physical_batch_size is None
    )


def test_the_missions_command_plans_imagenet_without_its_data(tmp_path, capsys):
    empty = tmp_path / "tfds"
    empty.mkdir()
    run_dir = tmp_path / "run"
    code, out, err = run_cli(
        [
            "--dataset=imagenet2012",
            "--target_eps=8",
            "--dry_run",
            f"--data_dir={empty}",
            f"--model_dir={run_dir}",
        ],
        capsys,
    )
    assert code == 0, err
    assert f"N={IMAGENET_N} training examples" in out
    assert "batch_size B         32768" in out and "steps S              18000" in out
    assert "augmult K            8" in out and "delta                8e-07" in out
    epsilon = float(out.split("epsilon")[1].split()[0])
    assert 7.9 < epsilon <= 8.0
    sigma = float(out.split("noise_multiplier")[1].split()[0])
    assert sigma == pytest.approx(2.5, abs=0.02)  # the paper's sigma at epsilon 8
    assert "nf_resnet50" in out and "not prepared here" in out
    assert not run_dir.exists() and os.listdir(empty) == []


def test_a_dry_run_plans_with_the_prepared_datas_own_n(tmp_path, capsys):
    # Power check of the known-N fallback: a prepared (here synthetic, 16
    # images) imagenet2012 is planned with its own N, not 1,281,167.
    from tan_keras.data.synthetic_imagenet import make_synthetic_imagenet

    make_synthetic_imagenet(str(tmp_path), train=16, validation=2)
    args = ["--dataset=imagenet2012", f"--data_dir={tmp_path}", "--batch_size=4", "--dry_run"]
    code, out, err = run_cli([*args, "--noise_multiplier=1", "--delta=1e-3"], capsys)
    assert code == 0, err
    assert "N=16 training examples" in out and "not prepared here" not in out


def test_a_real_run_without_the_data_fails_fast_writing_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, _, err = run_cli(
        [
            "--dataset=imagenet2012",
            "--target_eps=8",
            f"--data_dir={tmp_path}",
            f"--model_dir={run_dir}",
        ],
        capsys,
    )
    assert code != 0 and "not prepared" in err and "array_record" in err
    assert not run_dir.exists()


def test_known_facts_match_what_the_loader_yields():
    data = datasets.load_digits()
    facts = datasets.known_facts("digits")
    assert (facts.size, facts.input_shape, facts.num_classes) == (
        data.size,
        data.input_shape,
        data.num_classes,
    )
    assert datasets.known_facts("imagenet2012").size == IMAGENET_N
