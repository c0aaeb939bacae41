"""ImageNet on the JAX backend: TFDS's data source and Pillow, no TensorFlow.

A synthetic imagenet2012 in TFDS's own format (`data.synthetic_imagenet`,
written here without TensorFlow) is read as lazy views, decoded by Pillow
(`data.imagenet_numpy`), drawn K views each with the ImageNet policy, and
trained on by the program end to end (`--dataset=imagenet2012`).
"""

import importlib.util
import sys

import numpy as np
import pytest

from tan_keras.data import datasets, image_views, imagenet_numpy
from tan_keras.data.synthetic_imagenet import make_synthetic_imagenet
from tan_keras.training import program
from tan_keras.training.train_config import TrainConfig

TRAIN, TEST = 12, 5


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("imagenet")
    make_synthetic_imagenet(str(data_dir), train=TRAIN, validation=TEST, seed=3)
    return str(data_dir), datasets.load_dataset("imagenet2012", str(data_dir))


def test_it_loads_as_lazy_views_decoded_by_pillow(imagenet):
    _, data = imagenet
    assert data.size == TRAIN and len(data.test_y) == TEST and data.num_classes == 1000
    assert data.input_shape == (224, 224, 3)
    assert data.train_x.decode is imagenet_numpy.decode_preprocess
    image = data.train_x[3]
    assert image.shape == (224, 224, 3) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.05
    np.testing.assert_array_equal(
        image, imagenet_numpy.decode_preprocess(data.train_x.encoded([3])[0])
    )
    if importlib.util.find_spec("tensorflow") is None:
        assert "tensorflow" not in sys.modules


def test_lazy_images_need_the_callers_declaration(imagenet):
    _, data = imagenet
    # Decoded one at a time, never compared: a person at two indices
    # would not be found (power: the declaration is what lets them in).
    with pytest.raises(ValueError, match="repeated_rows.*distinct_people.*lazy images"):
        image_views.AugmentedImages(data.train_x, data.train_y, 2, "imagenet")
    source = image_views.AugmentedImages(
        data.train_x, data.train_y, 2, "imagenet", repeated_rows="distinct_people"
    )
    views, label = source[5]
    assert len(source) == TRAIN and views.shape == (2, 224, 224, 3)
    assert label == data.train_y[5]
    assert 0.0 <= views.min() and views.max() <= 1.0
    assert not np.array_equal(views, source[5][0])  # fresh views at every call


def test_the_program_trains_on_it_end_to_end(imagenet, tmp_path, capsys):
    data_dir, _ = imagenet
    config = TrainConfig(
        dataset="imagenet2012",
        data_dir=data_dir,
        model="small_cnn",
        batch_size=2,
        # A chunk of one example on each of the 4 devices: 8 rows a step
        # (at 224 x 224, the per-example work dominates on 2 cores).
        examples_per_chunk=1,
        steps=2,
        augmult=2,
        target_eps=8.0,  # the mission's command, at 2 updates
        delta=1e-3,
        model_dir=str(tmp_path / "run"),
    )
    assert config.augment == "imagenet"  # the recipe's policy, colour jitter included
    metrics = program.run(config)
    out = capsys.readouterr().out
    assert metrics["steps"] == 2 and metrics["dataset_size"] == TRAIN
    assert metrics["epsilon"] <= 8.0 and metrics["private"]
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert f"N={TRAIN} training examples" in out and "dp_steps=2" in out
