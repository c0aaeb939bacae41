"""Datasets as random-access arrays, the form DP-SGD's Poisson sampling needs.

Poisson sampling draws each training example independently, so the privacy
accountant needs the exact number N of distinct training examples and the
loader needs random access. Small datasets (digits, CIFAR) are loaded into
memory as numpy arrays; ImageNet is exposed through lazy array-like views over
`tfds.data_source`.

Nothing here downloads by surprise: tfds datasets are read only from a
prepared `data_dir` (unless `download=True`), and a missing dataset raises
`DatasetUnavailableError` at once with the command that prepares it, instead
of hanging on a machine without network.
"""

import dataclasses
from typing import Any, Callable, Optional, Tuple

import numpy as np

from tan_keras import _backend, _startup, _validate
from tan_keras.data import policies

DATASET_NAMES = ("digits", "cifar10", "cifar100", "imagenet2012")
_IN_MEMORY_TFDS = ("cifar10", "cifar100")
_READ_CHUNK = 10_000


@dataclasses.dataclass(frozen=True)
class DatasetFacts:
    """What is known of a dataset without reading it (for a dry run's plan).

    Attributes:
      name: Dataset name.
      size: N, the number of training examples the loader yields.
      input_shape: Shape of one model input, (H, W, C).
      num_classes: Number of classes.
    """

    name: str
    size: int
    input_shape: Tuple[int, ...]
    num_classes: int


# The train split each loader yields: digits' stratified 80% of scikit-learn's
# 1797 images; the TFDS train splits (ImageNet: ILSVRC2012's 1,281,167
# training images, cropped to 224 by `augment.imagenet_preprocess`).
_FACTS = {
    "digits": DatasetFacts("digits", 1437, (8, 8, 1), 10),
    "cifar10": DatasetFacts("cifar10", 50_000, (32, 32, 3), 10),
    "cifar100": DatasetFacts("cifar100", 50_000, (32, 32, 3), 100),
    "imagenet2012": DatasetFacts("imagenet2012", 1_281_167, (224, 224, 3), 1000),
}


def known_facts(name: str) -> DatasetFacts:
    """N, the input shape and the classes of a dataset, without its data.

    Args:
      name: One of `DATASET_NAMES`.

    Returns:
      Its `DatasetFacts` (what its loader yields when the data is there).

    Raises:
      ValueError: if `name` is unknown.
    """
    return _FACTS[_validate.one_of("dataset", name, DATASET_NAMES)]


class DatasetUnavailableError(ValueError):
    """The dataset is not prepared locally; the message says how to get it."""


# eq=False: == on numpy fields is elementwise, so a generated __eq__ would fail.
@dataclasses.dataclass(frozen=True, eq=False)
class ArrayDataset:
    """A labelled image dataset with a fixed train/test split.

    Attributes:
      train_x: Training images, float32 in [0, 1], shape (N, H, W, C). A numpy
        array, or for ImageNet a lazy view with the same `shape`, `dtype`,
        `len()` and (fancy) indexing.
      train_y: Training labels, int32, shape (N,).
      test_x: Test images, like `train_x`.
      test_y: Test labels, like `train_y`.
      num_classes: Number of classes; labels are in [0, num_classes).
      name: Dataset name, e.g. "digits".

    Raises:
      ValueError: if a split has a different number of images and labels.
    """

    train_x: Any
    train_y: Any
    test_x: Any
    test_y: Any
    num_classes: int
    name: str

    def __post_init__(self):
        for split, x, y in (
            ("train", self.train_x, self.train_y),
            ("test", self.test_x, self.test_y),
        ):
            if len(x) != len(y):
                raise _validate.invalid(
                    f"{split}_y",
                    f"as many labels as {split}_x has images ({len(x)})",
                    f"<{len(y)} labels>",
                )

    @property
    def size(self) -> int:
        """N, the number of distinct training examples (sets q = B / N)."""
        return len(self.train_y)

    @property
    def input_shape(self) -> Tuple[int, ...]:
        """Shape of one image, (H, W, C)."""
        return tuple(int(d) for d in self.train_x.shape[1:])


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> ArrayDataset:
    """Loads scikit-learn's bundled 8x8 handwritten digits (1797 images, offline).

    Args:
      test_fraction: Fraction of the images held out for testing.
      seed: Seed of the split; the same seed always gives the same split.

    Returns:
      An `ArrayDataset` with images (n, 8, 8, 1) float32 in [0, 1] and int32
      labels; the split is stratified, so every class keeps its proportion.

    Raises:
      ValueError: if `test_fraction` is not in (0, 1) or `seed` is negative.
    """
    test_fraction = _validate.real(
        "test_fraction",
        test_fraction,
        low=0.0,
        high=1.0,
        low_inclusive=False,
        high_inclusive=False,
    )
    seed = _validate.integer("seed", seed, low=0)
    # Imported here so the module loads without scikit-learn when unused.
    from sklearn import datasets as sk_datasets
    from sklearn import model_selection

    digits = sk_datasets.load_digits()
    # Pixel values are counts of set bits in 4x4 blocks, 0..16.
    images = (digits.images / 16.0).astype(np.float32)[..., np.newaxis]
    labels = digits.target.astype(np.int32)
    train_x, test_x, train_y, test_y = model_selection.train_test_split(
        images, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )
    return ArrayDataset(train_x, train_y, test_x, test_y, num_classes=10, name="digits")


def _unavailable(name: str, data_dir: Optional[str]) -> DatasetUnavailableError:
    where = data_dir or "~/tensorflow_datasets"
    if name == "imagenet2012":
        how = (
            "ImageNet cannot be downloaded automatically: register at "
            "https://image-net.org/download-images, put ILSVRC2012_img_train.tar "
            f"and ILSVRC2012_img_val.tar into {where}/downloads/manual/, then run "
            f"`tfds build imagenet2012 --data_dir={where} "
            "--file_format=array_record` once (random access needs the "
            "array_record format; expect ~150 GB and hours of preprocessing)."
        )
    else:
        how = (
            f"To get it, run `tfds build {name} --data_dir={where}` once on a "
            f"machine with network access (or call load_dataset('{name}', "
            "data_dir=..., download=True) there) and copy the directory here "
            "if needed."
        )
    return DatasetUnavailableError(
        f"Dataset {name!r} is not prepared in {where}, and tan_keras never "
        f"downloads it implicitly. {how} The bundled 'digits' dataset needs no "
        "download."
    )


def _tfds(name: str):
    """TensorFlow Datasets, loaded after TensorFlow (without its C++ log).

    Raises:
      DatasetUnavailableError: where either is not installed.
    """
    try:
        _startup.load_tensorflow()
        import tensorflow_datasets as tfds
    except ImportError as err:
        # tan_keras[jax] (a Colab TPU runtime) has neither.
        raise DatasetUnavailableError(
            f"Dataset {name!r} is read with TensorFlow Datasets, which needs TensorFlow "
            f"and tensorflow-datasets ({err.name or err} is not installed; tan_keras[jax] "
            "brings neither). Install tan_keras[tensorflow] beside it (Keras can still run "
            "on JAX), or train on the bundled 'digits' dataset."
        ) from None
    return tfds


def _tfds_without_tensorflow(name: str):
    """TensorFlow Datasets on the JAX backend: its random-access data sources need no TensorFlow.

    Raises:
      DatasetUnavailableError: where tensorflow-datasets is not installed.
    """
    _startup.quiet_library_info()
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise DatasetUnavailableError(
            f"Dataset {name!r} is read with TensorFlow Datasets ({err.name or err} is not "
            "installed): install tan_keras[jax,imagenet] (tensorflow-datasets, array_record "
            "and Pillow; no TensorFlow)."
        ) from None
    return tfds


def _builder(name: str, data_dir: Optional[str], download: bool, tfds=None):
    tfds = tfds or _tfds(name)
    builder = tfds.builder(name, data_dir=data_dir)
    if download:
        builder.download_and_prepare()
    return builder


def load_tfds(
    name: str,
    data_dir: Optional[str] = None,
    split_train: str = "train",
    split_test: str = "test",
    *,
    download: bool = False,
) -> ArrayDataset:
    """Loads CIFAR-10 or CIFAR-100 from TensorFlow Datasets into memory.

    Args:
      name: "cifar10" or "cifar100".
      data_dir: tfds data directory; None uses tfds' default
        (~/tensorflow_datasets).
      split_train: tfds split used for training.
      split_test: tfds split used for testing.
      download: Whether to download and prepare the dataset first (needs
        network). By default only prepared data is read.

    Returns:
      An `ArrayDataset` with images float32 in [0, 1] (N, 32, 32, 3) and
      int32 labels.

    Raises:
      ValueError: if `name` is not a supported in-memory dataset.
      DatasetUnavailableError: if the dataset is not prepared in `data_dir`.
    """
    _validate.one_of("dataset", name, _IN_MEMORY_TFDS)
    tfds = _tfds(name)

    builder = _builder(name, data_dir, download)

    def read(split):
        try:
            data = builder.as_dataset(split=split, as_supervised=True)
        except AssertionError as error:
            # tfds reports "could not find data in <data_dir>" this way.
            # Asking as_dataset (rather than builder.is_prepared()) keeps
            # tfds.testing.mock_data working.
            raise _unavailable(name, data_dir) from error
        # Chunks rather than batch_size=-1: that batches by the split size
        # recorded in the metadata, which mocked or partial builds lack.
        chunks = list(tfds.as_numpy(data.batch(_READ_CHUNK)))
        images = np.concatenate([images for images, _ in chunks])
        labels = np.concatenate([labels for _, labels in chunks])
        return images.astype(np.float32) / 255.0, labels.astype(np.int32)

    train_x, train_y = read(split_train)
    test_x, test_y = read(split_test)
    num_classes = builder.info.features["label"].num_classes
    return ArrayDataset(train_x, train_y, test_x, test_y, num_classes=num_classes, name=name)


class _SourceView:
    """Read-only array-like view of one feature of a random-access tfds source.

    Indexing with an int returns one item; with a slice, list or integer array
    it returns the stacked items, so `view[indices]` works like numpy fancy
    indexing for a Poisson-sampled batch.
    """

    def __init__(self, source, key: str, transform: Callable, item_shape, dtype):
        self._source = source
        self._key = key
        self._transform = transform
        self.shape = (len(source), *item_shape)
        self.dtype = np.dtype(dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def _item(self, record) -> np.ndarray:
        return np.asarray(self._transform(record[self._key]), dtype=self.dtype)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return self._item(self._source[int(index)])
        indices = np.arange(len(self))[index]
        items = [self._item(self._source[int(i)]) for i in indices]
        return np.stack(items) if items else np.zeros((0, *self.shape[1:]), self.dtype)


class _EncodedImages(_SourceView):
    """A `_SourceView` of JPEG-encoded images, also readable undecoded.

    `view[indices]` decodes (in Python: for evaluation and tests);
    `encoded(indices)` returns the JPEG bytes for the training input, which
    decodes them natively in parallel (`train_data`).
    """

    def __init__(self, source, key: str, decode: Callable, item_shape):
        # (TensorFlow's decoder returns a tensor, the numpy one an array.)
        super().__init__(source, key, lambda jpeg: np.asarray(decode(jpeg)), item_shape, np.float32)
        self.decode = decode

    def encoded(self, indices) -> np.ndarray:
        """The JPEG bytes of the items at `indices` (an object array)."""
        items = np.empty(len(indices), dtype=object)
        for row, i in enumerate(indices):
            items[row] = self._source[int(i)][self._key]
        return items


def load_imagenet(data_dir: Optional[str] = None, *, download: bool = False) -> ArrayDataset:
    """Opens ImageNet (ILSVRC 2012) as lazy random-access views.

    Images are decoded on access and go through `augment.imagenet_preprocess`
    (shorter side to 256, center crop 224, float32 in [0, 1]); labels are read
    without decoding the images. The official validation split is the test
    split. On Keras's JAX backend nothing here uses TensorFlow: TFDS reads
    the array_record files and Pillow decodes (`imagenet_numpy`).

    Args:
      data_dir: tfds data directory holding `imagenet2012` prepared in the
        array_record format; None uses tfds' default.
      download: Whether to run `download_and_prepare` first (needs the
        manually downloaded tar files in <data_dir>/downloads/manual).

    Returns:
      An `ArrayDataset` whose `train_x`/`test_x` are (N, 224, 224, 3) float32
      views and `train_y`/`test_y` int32 views.

    Raises:
      DatasetUnavailableError: if ImageNet is not prepared (in array_record
        format) in `data_dir`.
    """
    name = "imagenet2012"
    on_jax = _backend.in_use() == "jax"
    tfds = _tfds_without_tensorflow(name) if on_jax else _tfds(name)
    if on_jax:
        from tan_keras.data import imagenet_numpy

        decode = imagenet_numpy.decode_preprocess
    else:
        from tan_keras.data import augment

        decode = augment.decode_imagenet
    builder = _builder(name, data_dir, download, tfds)
    image_shape = (policies.IMAGENET_CROP, policies.IMAGENET_CROP, 3)

    def views(split):
        try:
            # JPEG bytes: decoded by the input pipeline, natively and in
            # parallel, not by TFDS in Python.
            source = builder.as_data_source(
                split=split, decoders={"image": tfds.decode.SkipDecoding()}
            )
        except (AssertionError, ValueError, NotImplementedError) as error:
            # Unprepared: "file format is not set"; prepared as tfrecord:
            # NotImplementedError (no random access). Same fix for both.
            raise _unavailable(name, data_dir) from error
        return (
            _EncodedImages(source, "image", decode, image_shape),
            _SourceView(source, "label", lambda label: label, (), np.int32),
        )

    train_x, train_y = views("train")
    test_x, test_y = views("validation")
    num_classes = builder.info.features["label"].num_classes
    return ArrayDataset(train_x, train_y, test_x, test_y, num_classes=num_classes, name=name)


def load_dataset(
    name: str = "digits", data_dir: Optional[str] = None, *, download: bool = False
) -> ArrayDataset:
    """Loads a dataset by name.

    Args:
      name: One of `DATASET_NAMES`. "digits" is bundled with scikit-learn and
        needs no download.
      data_dir: tfds data directory for the tfds datasets; ignored for
        "digits".
      download: For tfds datasets, whether to download and prepare first.

    Returns:
      An `ArrayDataset`.

    Raises:
      ValueError: if `name` is unknown.
      DatasetUnavailableError: if a tfds dataset is not prepared in `data_dir`.
    """
    _validate.one_of("dataset", name, DATASET_NAMES)
    if name == "digits":
        return load_digits()
    if name == "imagenet2012":
        return load_imagenet(data_dir, download=download)
    return load_tfds(name, data_dir, download=download)
