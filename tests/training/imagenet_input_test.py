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
import tensorflow as tf
from train_test import run_cli

from tan_keras.data import augment, datasets
from tan_keras.data.synthetic_imagenet import make_synthetic_imagenet
from tan_keras.mechanism import sampling, views
from tan_keras.training import train_data

N, TEST = 24, 6
IMAGE = (224, 224, 3)


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
    # Padded to 2 micro-batches (B + 4 std = 15 rows): the step ends in the second.
    assert _sampler().steps_padded_to == 2 and not step_end.numpy().any()
    assert tag.shape == (8, len(sampling.IDENTITY_COLUMNS))
    test = next(iter(train_data.test_dataset(data.test_x, data.test_y, 4)))
    np.testing.assert_array_equal(test[0].numpy(), data.test_x[np.arange(4)])


def test_views_are_keyed_by_example_on_every_host(imagenet, monkeypatch):
    _, data = imagenet
    augmenter = augment.make_augmenter("imagenet", data.input_shape)

    def encoded(shards=1, shard=0):
        dataset = train_data.encoded_train_dataset(
            data.train_x, data.train_y, _sampler(), 2, augmenter, shards, shard
        )
        return [t.numpy() for t in next(iter(dataset))[:3]]

    x, y, mask = encoded()
    real = mask > 0
    assert x.shape == (8, 2, *IMAGE) and 2 <= real.sum() < 8  # real and padding rows
    assert not x[~real].any()  # padding rows: zero images, never decoded
    assert not np.array_equal(x[real][:, 0], x[real][:, 1])  # two views differ
    # Each real row holds its example's label and the views `make_views`
    # draws for it from the decoded image, keyed by (step key, example,
    # view), the call the in-memory pipeline makes.
    indices, _, _, _, key = next(iter(_sampler().micro_batches(1, with_seeds=True)))
    indices = indices.numpy()[real]
    np.testing.assert_array_equal(y[real], data.train_y[indices])
    want = views.make_views(
        data.train_x[indices], 2, augmenter, seed=key, example_ids=indices
    ).numpy()
    np.testing.assert_array_equal(x[real], want)
    # Two hosts, each decoding its half of the micro-batch: together every
    # real row once, with the same views.
    halves = [encoded(2, shard) for shard in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([h[0][h[2] > 0] for h in halves]), x[real])
    # Power check: views keyed by the row in the call rather than the
    # example are rejected.
    keyed = views.view_keys
    monkeypatch.setattr(views, "view_keys", lambda key, ids, k: keyed(key, 0 * ids, k))
    assert not np.array_equal(encoded()[0][real], want)


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


class _Images:
    """A lazy view of encoded images, as `datasets.load_imagenet` gives."""

    def __init__(self, jpegs):
        self._jpegs = jpegs
        self.shape = (len(jpegs), *IMAGE)
        self.decode = augment.decode_imagenet

    def __len__(self):
        return len(self._jpegs)

    def encoded(self, indices):
        items = np.empty(len(indices), dtype=object)
        items[:] = [self._jpegs[int(i)] for i in indices]
        return items


@pytest.mark.parametrize("bad", [b"", "truncated"])
def test_an_undecodable_image_is_refused_naming_the_example(bad):
    good = tf.io.encode_jpeg(tf.zeros([40, 30, 3], tf.uint8)).numpy()
    bad = good[: len(good) // 2] if bad == "truncated" else bad
    jpegs = [good, good, bad, good]
    labels = np.zeros(4, np.int32)
    # q = 1: every example is in the first step; the real rows are decoded.
    sampler = sampling.PoissonSampler(4, 4, physical_batch_size=4, secret_key=5)
    train = train_data.train_dataset(_Images(jpegs), labels, sampler, 1, None)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"training example at index\] \[2\]"):
        next(iter(train))
    test = train_data.test_dataset(_Images(jpegs), labels, 4)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"test example at index\] \[2\]"):
        next(iter(test))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_shards=3), "num_shards"),  # does not divide P = 8
        (dict(num_shards=0), "num_shards"),
        (dict(num_shards=2, shard_index=2), "shard_index"),
        (dict(sampler=sampling.PoissonSampler(N + 1, 6, physical_batch_size=8)), "dataset_size"),
        (dict(augmult=0), "augmult"),
    ],
)
def test_encoded_input_refuses_bad_arguments(imagenet, kwargs, name):
    _, data = imagenet
    args = {**dict(sampler=_sampler(), augmult=1, augmenter=None), **kwargs}
    with pytest.raises(ValueError, match=f"Invalid value for `{name}`"):
        next(iter(train_data.encoded_train_dataset(data.train_x, data.train_y, **args)))
