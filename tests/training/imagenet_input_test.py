"""The ImageNet training input on a synthetic imagenet2012 in TFDS's own format.

`tan_keras.data.synthetic_imagenet` writes array_record files that TFDS reads
as a prepared ILSVRC 2012; the program's input reads the sampled rows' JPEG
bytes and decodes each example once, natively and in parallel. Its images
must equal TFDS-style decoding in Python, its views must be keyed by
(step, example, view) whichever host holds the example, and the program must
train on it end to end.
"""

import numpy as np
import pytest
from train_test import run_cli

from tan_keras.data import augment, datasets
from tan_keras.data.synthetic_imagenet import make_synthetic_imagenet
from tan_keras.mechanism import sampling
from tan_keras.training import train_data

N, TEST = 24, 6


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    make_synthetic_imagenet(str(data_dir), train=N, validation=TEST, seed=3)
    return str(data_dir), datasets.load_dataset("imagenet2012", str(data_dir))


def _sampler(physical=8):
    return sampling.PoissonSampler(N, 6, physical_batch_size=physical, secret_key=5)


def test_the_synthetic_dataset_loads_as_imagenet2012(imagenet):
    _, data = imagenet
    assert (data.size, data.input_shape, data.num_classes) == (N, (224, 224, 3), 1000)
    assert len(data.test_y) == TEST
    jpegs = data.train_x.encoded([0, 5])
    assert all(isinstance(j, bytes) and j[:2] == b"\xff\xd8" for j in jpegs)  # JPEG


def test_native_decoding_equals_the_python_path(imagenet):
    _, data = imagenet
    x, y, mask, step_end, tag = next(
        iter(train_data.train_dataset(data.train_x, data.train_y, _sampler(), 1, None))
    )
    rows = int(mask.numpy().sum())
    indices = _sampler().sample_indices(0).numpy()
    assert rows == len(indices) and x.shape == (8, 224, 224, 3)
    np.testing.assert_array_equal(x.numpy()[:rows], data.train_x[indices])
    np.testing.assert_array_equal(y.numpy()[:rows], data.train_y[indices])
    assert not x.numpy()[rows:].any()  # padding rows: zeros, never decoded
    assert step_end.numpy().all() and tag.shape == (8, 2)
    test = next(iter(train_data.test_dataset(data.test_x, data.test_y, 4)))
    np.testing.assert_array_equal(test[0].numpy(), data.test_x[np.arange(4)])


def test_two_hosts_draw_the_same_views_of_an_example(imagenet):
    _, data = imagenet
    augmenter = augment.make_augmenter("imagenet", data.input_shape)

    def views(shards, shard):
        dataset = train_data.encoded_train_dataset(
            data.train_x, data.train_y, _sampler(), 2, augmenter, shards, shard
        )
        x, _, mask, _, _ = next(iter(dataset))
        return x.numpy()[mask.numpy() > 0]

    whole = views(1, 0)
    halves = np.concatenate([views(2, 0), views(2, 1)])
    assert whole.shape[1:] == (2, 224, 224, 3)
    np.testing.assert_array_equal(halves, whole)
    assert not np.array_equal(whole[:, 0], whole[:, 1])  # two views differ


def test_the_program_trains_on_it_end_to_end(imagenet, tmp_path, capsys):
    data_dir, _ = imagenet
    code, out, err = run_cli(
        [
            "--dataset=imagenet2012",
            f"--data_dir={data_dir}",
            "--model=small_cnn",
            "--batch_size=4",
            "--physical_batch_size=4",
            "--steps=2",
            "--augmult=2",
            "--noise_multiplier=1",
            "--delta=1e-3",
            f"--model_dir={tmp_path / 'run'}",
        ],
        capsys,
    )
    assert code == 0, err[-3000:]
    assert "N=24 training examples" in out and "metrics:" in out
