"""A search that tunes on a held-out split: its final run never sees a tuning example."""

import dataclasses
import json

import numpy as np
import pytest

from tan_keras.data import datasets, splits
from tan_keras.training import (
    program,
    search_lib,
    search_results,
    train_data,
    train_flags,
    training_set,
)
from tan_keras.training.train_config import TrainConfig

REF_B, SIGMA_REF, STEPS, TUNING = 256, 4.0, 2, 300


def _spec(tmp_path, **kwargs):
    return search_lib.SearchSpec(
        ref_batch_size=REF_B,
        ref_noise_multiplier=SIGMA_REF,
        steps=STEPS,
        batch_sizes=(16,),
        grid=search_lib.parse_grid(["lr=1,2"]),
        output_dir=str(tmp_path),
        dataset="digits",
        **kwargs,
    )


def test_search_on_a_tuning_split_then_final_run_on_the_private_set(tmp_path, monkeypatch):
    spec = _spec(tmp_path, tuning_examples=TUNING, tuning_split_seed=1)
    records, trained, _ = search_lib.run_search(
        spec, search_lib.in_process_runner(str(tmp_path / "logs")), log=lambda _: None
    )
    assert trained == 2
    private_n = datasets.known_facts("digits").size - TUNING
    for record in records:
        # Each simulation trained on the tuning split only, and planned the
        # private run it simulates on the other examples.
        assert record["training_set"] == "tuning" and record["dataset_size"] == TUNING
        assert record["reference_dataset_size"] == private_n
    summary = search_results.summarize(spec, records)
    coverage = summary["coverage"]
    assert coverage["mode"] == "tuning_split" and coverage["covers_tuning"]
    assert coverage["tuning_set"]["examples"] == TUNING
    assert coverage["private_set"]["examples"] == private_n
    assert coverage["statement"].startswith("COVERED: the simulations trained only on the 300")
    report = search_results.format_report(summary, trained, 0)
    assert coverage["statement"] in report
    assert f"Tuning set: {TUNING} digits examples; private set (final run): {private_n}" in report
    argv = summary["final_argv"]
    assert "--tuning_examples=300" in argv and "--tuning_split_seed=1" in argv

    # The final command trains on the private set: exactly the rows the
    # split leaves out of the tuning set, N = 1437 - 300.
    seen = {}
    real_train_dataset = train_data.train_dataset

    def recording(train_x, train_y, *args, **kwargs):
        seen["x"], seen["y"] = np.array(train_x), np.array(train_y)
        return real_train_dataset(train_x, train_y, *args, **kwargs)

    monkeypatch.setattr(train_data, "train_dataset", recording)
    settings = train_flags.parse(argv)
    final = TrainConfig(**{**settings, "model_dir": str(tmp_path / "final")})
    metrics = program.run(final)
    digits = datasets.load_digits()
    split = splits.tuning_split(digits.size, TUNING, 1)
    assert np.array_equal(seen["x"], digits.train_x[split.private_indices])
    assert np.array_equal(seen["y"], digits.train_y[split.private_indices])
    assert metrics["dataset_size"] == private_n and metrics["training_set"] == "private"
    assert metrics["train_split_size"] == digits.size and metrics["tuning_examples"] == TUNING
    assert metrics["epsilon"] == pytest.approx(summary["plan"]["reference"]["epsilon"], rel=1e-9)
    with open(tmp_path / "final" / "metrics.json") as f:
        assert json.load(f)["dataset_size"] == private_n

    # The same output_dir for a search on the private set: its finished runs
    # trained on the tuning split, and are not silently ranked as its own.
    with pytest.raises(ValueError, match=r"Invalid value for `output_dir`.*--tuning_examples=300"):
        search_lib.run_search(_spec(tmp_path), lambda c, n: None, log=lambda _: None)


def test_coverage_is_stated_in_every_mode(tmp_path):
    record = {"dataset_size": 1437, "reference_dataset_size": 1437}
    on_private = search_results.coverage(_spec(tmp_path), record, 7.0, 1e-5)
    assert on_private["mode"] == "private_set" and not on_private["covers_tuning"]
    assert on_private["statement"].startswith("NOT COVERED: the simulations trained on the same")
    assert "not the choice of those hyper-parameters" in on_private["statement"]
    assert "NOT cover" in search_lib.tuning_data_line(_spec(tmp_path))

    proxy = _spec(tmp_path, tuning_dataset="cifar10")
    record = {"dataset_size": 50000, "reference_dataset_size": 1437}
    on_proxy = search_results.coverage(proxy, record, 7.0, 1e-5)
    assert on_proxy["mode"] == "proxy_dataset" and on_proxy["covers_tuning"]
    assert on_proxy["tuning_set"] == {"dataset": "cifar10", "examples": 50000}
    assert on_proxy["private_set"] == {"dataset": "digits", "examples": 1437}
    # The simulations run on the proxy with the final dataset's recipe, and
    # plan the private run on the final dataset's N.
    sim = search_lib.simulation_settings(proxy, proxy.configs[0], 16, 0)
    assert sim["dataset"] == "cifar10" and sim["ref_dataset_size"] == 1437
    assert sim["model"] == "small_cnn" and sim["augmult"] == 4
    assert search_lib.final_settings(proxy, proxy.configs[0])["dataset"] == "digits"


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"tuning_dataset": "digits"}, "tuning_dataset"),  # the private dataset itself
        ({"tuning_dataset": "cifar10", "tuning_examples": 10}, "tuning_dataset"),
        ({"tuning_examples": 0}, "tuning_examples"),
        ({"tuning_split_seed": -1}, "tuning_split_seed"),
        ({"tuning_split_seed": 3}, "tuning_split_seed"),  # no split to seed
        ({"train_flags": ("--train_on=tuning",)}, "train_flags"),  # the search sets it
    ],
)
def test_spec_refuses_bad_tuning_data(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=f"Invalid value for `{name}`"):
        _spec(tmp_path, **kwargs)


def test_training_set_describes_both_parts():
    config = TrainConfig(tuning_examples=TUNING, train_on="tuning")
    data, examples = training_set.choose(config, datasets.known_facts("digits"))
    assert data.size == TUNING and examples.private_size == 1137
    assert "N=300 tuning examples" in examples.describe()
    assert "the other 1137, is never trained on" in examples.describe()
    _, private = training_set.choose(
        TrainConfig(tuning_examples=TUNING), datasets.known_facts("digits")
    )
    assert private.size == 1137 and "minus the 300 of the tuning split" in private.describe()


def test_search_on_a_proxy_dataset_trains_on_no_private_example(tmp_path):
    import tensorflow_datasets as tfds

    spec = dataclasses.replace(
        _spec(tmp_path, tuning_dataset="cifar10"), grid=search_lib.parse_grid(["lr=1"])
    )
    with tfds.testing.mock_data(num_examples=64):
        records, trained, _ = search_lib.run_search(
            spec, search_lib.in_process_runner(str(tmp_path / "logs")), log=lambda _: None
        )
    (record,) = records
    assert trained == 1 and record["dataset"] == "cifar10" and record["dataset_size"] == 64
    # The simulation planned the private run on digits' N, with digits' recipe.
    assert record["reference_dataset_size"] == 1437 and record["model"] == "small_cnn"
    summary = search_results.summarize(spec, records)
    assert summary["coverage"]["statement"].startswith("COVERED: the simulations trained only")
    assert summary["plan"]["reference"]["epsilon"] == pytest.approx(
        program.train_plan.plan_privacy(
            TrainConfig(batch_size=REF_B, noise_multiplier=SIGMA_REF, steps=STEPS), 1437
        ).epsilon,
        rel=1e-9,
    )
    assert train_flags.parse(summary["final_argv"])["dataset"] == "digits"
