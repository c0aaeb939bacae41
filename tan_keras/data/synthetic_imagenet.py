"""A synthetic ImageNet in TFDS's own imagenet2012 storage format.

ImageNet cannot be downloaded here (nor by tests anywhere). This writes a
small dataset that TFDS reads exactly as it reads a prepared ILSVRC 2012:
same builder name, version, features (JPEG-encoded images, 1000 classes) and
array_record files, in `<data_dir>/imagenet2012/<version>/`. So
`tan_keras.train --dataset=imagenet2012 --data_dir=<data_dir>`, the input
pipeline and its benchmark run on it unchanged. The images have ImageNet's
typical sizes (longer side 500 pixels, shorter 333 to 400, either way up)
and smooth random content with grain: 71-85 KB at quality 90 (ImageNet's
training JPEGs average about 110 KB), so decoding does a photograph's work.

  python -m tan_keras.data.synthetic_imagenet --data_dir=/tmp/synthetic --train=2000
"""

import argparse
import io
from typing import Iterator, Tuple

import numpy as np

from tan_keras import _backend, _startup, _validate

_SIZES = ((500, 375), (375, 500), (500, 333), (333, 500), (500, 400), (400, 500))


def _jpeg(rng: np.random.Generator) -> bytes:
    from PIL import Image

    width, height = _SIZES[int(rng.integers(len(_SIZES)))]
    # Low-frequency colour fields plus fine grain: photograph-like JPEG sizes.
    coarse = rng.random((height // 25 + 2, width // 25 + 2, 3))
    image = Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(image, np.float32) + rng.normal(0.0, 12.0, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def make_synthetic_imagenet(
    data_dir: str, train: int = 2000, validation: int = 200, seed: int = 0
) -> str:
    """Writes a synthetic imagenet2012 (array_record) under `data_dir`.

    Args:
      data_dir: TFDS data directory to write into (`--data_dir` of a run).
      train: Training examples, >= 1.
      validation: Validation (test) examples, >= 1.
      seed: Seed of the images and labels.

    Returns:
      The directory of the prepared dataset version.

    Raises:
      ValueError: on a count < 1 or a negative seed.
    """
    train = _validate.positive_int("train", train)
    validation = _validate.positive_int("validation", validation)
    seed = _validate.integer("seed", seed, low=0)
    if _backend.in_use() != "jax":  # (TFDS writes without TensorFlow on JAX)
        _startup.load_tensorflow()
    import tensorflow_datasets as tfds

    real = tfds.builder_cls("imagenet2012")

    class SyntheticImagenet2012(real, skip_registration=True):
        """TFDS's imagenet2012 builder, fed synthetic examples instead of the tar files."""

        name = "imagenet2012"

        def _split_generators(self, dl_manager):
            del dl_manager  # nothing to download
            return {"train": _examples(train, seed), "validation": _examples(validation, seed + 1)}

    builder = SyntheticImagenet2012(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return builder.data_dir


def _examples(count: int, seed: int) -> Iterator[Tuple[str, dict]]:
    rng = np.random.default_rng(seed)
    for index in range(count):
        name = f"synthetic_{seed}_{index:07d}.JPEG"
        yield name, {"image": _jpeg(rng), "label": int(rng.integers(1000)), "file_name": name}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--validation", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        where = make_synthetic_imagenet(args.data_dir, args.train, args.validation, args.seed)
    except ValueError as err:
        parser.error(str(err))
    print(f"synthetic imagenet2012: {args.train} train, {args.validation} validation in {where}")


if __name__ == "__main__":
    main()
