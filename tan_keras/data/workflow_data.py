"""Generated stand-ins for the data of keras.io's example workflows.

The first-day workflows (`examples/`) port well-known keras.io examples
(structured data, text, images, transfer learning, time series) to private
training. Their datasets cannot be downloaded here, so each has a generated
stand-in of the same form (dict features with strings, raw texts, images,
sequences), deterministic by seed, with at least 10,000 training examples
and a task a small model learns but that is not trivial: labels carry noise
or need the structure the keras.io model is built for (word order, shape,
frequency).

Each function returns `((x_train, y_train), (x_test, y_test))` with integer
labels of shape (N,), as `keras.datasets` loaders do.
"""

from typing import Any, Tuple

import numpy as np
import tensorflow as tf

from tan_keras import _validate
from tan_keras.data import synthetic_text

Split = Tuple[Any, np.ndarray]

# Words of the generated reviews: synthetic_text's ids, spelled out.
_NOT = "not"
_POSITIVE = ("good", "great", "fine", "superb", "lovely", "fun", "clever", "moving")
_NEGATIVE = ("bad", "dull", "poor", "awful", "boring", "weak", "silly", "messy")
_THAL = ("normal", "fixed", "reversible")
_VOCAB_SIZE = 48
# Public bounds of the patients' numeric features (medical knowledge, not
# drawn from the records): what `private_adapt` clips to.
PATIENT_RANGES = dict(
    age=(0, 120), trestbps=(50, 250), chol=(50, 700), thalach=(40, 250), oldpeak=(0, 10)
)


def _sizes(num_train: int, num_test: int, seed: int) -> np.random.Generator:
    _validate.positive_int("num_train", num_train)
    _validate.positive_int("num_test", num_test)
    return np.random.default_rng(_validate.integer("seed", seed, low=0))


def _strings_as_tensors(x: dict) -> dict:
    # Keras's array adapter takes strings as tensors, not numpy "<U" arrays.
    return {k: tf.constant(v) if v.dtype.kind == "U" else v for k, v in x.items()}


def _split(x: Any, y: np.ndarray, num_train: int) -> Tuple[Split, Split]:
    if isinstance(x, dict):
        head = {k: v[:num_train] for k, v in x.items()}
        tail = {k: v[num_train:] for k, v in x.items()}
    else:
        head, tail = x[:num_train], x[num_train:]
    return (head, y[:num_train]), (tail, y[num_train:])


def patients(num_train: int = 12_000, num_test: int = 3_000, seed: int = 0):
    """Heart-disease-like records (keras.io's structured-data examples).

    Args:
      num_train: Training records, an integer >= 1.
      num_test: Test records, an integer >= 1.
      seed: Seed, an integer >= 0.

    Returns:
      ((x_train, y_train), (x_test, y_test)): x a dict of arrays of shape
      (N, 1): numeric "age", "trestbps", "chol", "thalach", "oldpeak"
      (float32), integer categories "sex" (0, 1) and "cp" (0-4), string
      category "thal" (a string tensor); y the diagnosis (0 or 1), from a noisy logistic rule
      in which every kind of feature matters (about 0.85 is reachable).
    """
    rng = _sizes(num_train, num_test, seed)
    n = num_train + num_test
    age = rng.uniform(29, 77, n)
    trestbps = rng.normal(131, 17, n).clip(94, 200)
    chol = rng.normal(246, 51, n).clip(126, 564)
    thalach = rng.normal(150, 23, n).clip(71, 202)
    oldpeak = rng.exponential(1.0, n).clip(0, 6.2)
    sex = rng.integers(0, 2, n)
    cp = rng.integers(0, 5, n)
    thal = rng.integers(0, 3, n)
    logit = (
        0.06 * (age - 53)
        + 0.02 * (trestbps - 131)
        + 0.01 * (chol - 246)
        - 0.04 * (thalach - 150)
        + 0.9 * (oldpeak - 1.0)
        + 0.8 * (sex - 0.5)
        + np.array([-1.5, -0.5, 0.0, 0.8, 1.6])[cp]
        + np.array([-1.2, 0.3, 1.4])[thal]
    )
    y = (rng.random(n) < 1 / (1 + np.exp(-2.0 * logit))).astype(np.int64)
    column = lambda v, dtype: np.asarray(v, dtype).reshape(n, 1)  # noqa: E731
    x = {
        "age": column(age, np.float32),
        "trestbps": column(trestbps, np.float32),
        "chol": column(chol, np.float32),
        "thalach": column(thalach, np.float32),
        "oldpeak": column(oldpeak, np.float32),
        "sex": column(sex, np.int64),
        "cp": column(cp, np.int64),
        "thal": np.array(_THAL)[thal].reshape(n, 1),  # strings: tensors below
    }
    (x_train, y_train), (x_test, y_test) = _split(x, y, num_train)
    return (_strings_as_tensors(x_train), y_train), (_strings_as_tensors(x_test), y_test)


def review_words() -> list:
    """The words of the generated reviews, in the order of their token ids 1, 2, ...

    Public knowledge (the language's words, not drawn from any review): give
    it to `TextVectorization(vocabulary=...)` instead of adapting on the
    training texts.
    """
    neutral = [f"w{i}" for i in range(2 + len(_POSITIVE) + len(_NEGATIVE), _VOCAB_SIZE)]
    return [_NOT] + list(_POSITIVE) + list(_NEGATIVE) + neutral


def review_texts(num_train: int = 12_000, num_test: int = 3_000, seed: int = 0):
    """Movie-review-like texts (keras.io's text-classification examples).

    `synthetic_text.make_reviews` spelled out as words: "not" flips the word
    after it, so word order matters.

    Args:
      num_train: Training reviews, an integer >= 1.
      num_test: Test reviews, an integer >= 1.
      seed: Seed, an integer >= 0.

    Returns:
      ((x_train, y_train), (x_test, y_test)): x a string tensor of shape
      (N,) (Keras's array adapter takes strings as tensors), y the
      sentiment (0 or 1).
    """
    _sizes(num_train, num_test, seed)
    reviews = synthetic_text.make_reviews(
        num_train=num_train, num_test=num_test, vocab_size=_VOCAB_SIZE, seed=seed
    )
    words = np.array([""] + review_words())
    spell = lambda ids: tf.constant([" ".join(words[row]) for row in ids])  # noqa: E731
    return (
        (spell(reviews.train_x), reviews.train_y.astype(np.int64)),
        (spell(reviews.test_x), reviews.test_y.astype(np.int64)),
    )


def _shape_masks(rng: np.random.Generator, labels: np.ndarray, size: int) -> np.ndarray:
    """Masks [N, size, size] of a filled square, disk, triangle or ring per label."""
    n = len(labels)
    grid = np.arange(size, dtype=np.float32)
    radius = rng.uniform(0.18, 0.32, (n, 1, 1)) * size
    cy = rng.uniform(0.35, 0.65, (n, 1, 1)) * size
    cx = rng.uniform(0.35, 0.65, (n, 1, 1)) * size
    dy, dx = grid[None, :, None] - cy, grid[None, None, :] - cx
    distance = np.sqrt(dy**2 + dx**2)
    masks = np.stack(
        [
            (np.abs(dy) < radius) & (np.abs(dx) < radius),
            distance < radius,
            (dy < radius) & (dy > -radius) & (np.abs(dx) < (dy + radius) / 2),
            (distance < radius) & (distance > 0.55 * radius),
        ]
    )
    return masks[labels % 4, np.arange(n)]


def shapes(
    num_train: int = 12_000,
    num_test: int = 3_000,
    image_size: int = 32,
    num_classes: int = 4,
    seed: int = 0,
):
    """Colored shapes on noisy backgrounds (keras.io's image-classification examples).

    Classes 0-3 are a square, a disk, a triangle and a ring at a random
    place, size and color; with `num_classes` 8, classes 4-7 are the same
    shapes in warm colors only and 0-3 in cool ones (a harder task, for a
    base pretrained on the 4-class one).

    Args:
      num_train: Training images, an integer >= 1.
      num_test: Test images, an integer >= 1.
      image_size: Height and width, an integer >= 8.
      num_classes: 4 or 8.
      seed: Seed, an integer >= 0.

    Returns:
      ((x_train, y_train), (x_test, y_test)): x uint8 images of shape
      (N, image_size, image_size, 3) with values 0-255, y the class.
    """
    rng = _sizes(num_train, num_test, seed)
    _validate.integer("image_size", image_size, low=8)
    _validate.one_of("num_classes", num_classes, (4, 8))
    n = num_train + num_test
    y = rng.integers(0, num_classes, n)
    masks = _shape_masks(rng, y, image_size)[..., None]
    warm = y >= 4 if num_classes == 8 else rng.random(n) < 0.5
    color = rng.uniform(0.5, 1.0, (n, 3))
    color[:, 0] = np.where(warm, color[:, 0], 0.4 * color[:, 0])
    color[:, 2] = np.where(warm, 0.4 * color[:, 2], color[:, 2])
    background = rng.uniform(0.0, 0.35, (n, 1, 1, 3))
    noise = rng.normal(0.0, 0.08, (n, image_size, image_size, 3))
    images = np.where(masks, color[:, None, None, :], background) + noise
    x = (images.clip(0, 1) * 255).astype(np.uint8)
    return _split(x, y.astype(np.int64), num_train)


def sensor_series(num_train: int = 12_000, num_test: int = 3_000, length: int = 128, seed: int = 0):
    """Engine-sensor-like series (keras.io's FordA time-series classification).

    Class 1 series hold a short burst at a higher frequency somewhere in a
    noisy base oscillation; class 0 series do not. Where the burst lies is
    random, so the model must look for it along the sequence.

    Args:
      num_train: Training series, an integer >= 1.
      num_test: Test series, an integer >= 1.
      length: Time steps, an integer >= 32.
      seed: Seed, an integer >= 0.

    Returns:
      ((x_train, y_train), (x_test, y_test)): x float32 of shape
      (N, length, 1), standardized per series; y the class (0 or 1).
    """
    rng = _sizes(num_train, num_test, seed)
    _validate.integer("length", length, low=32)
    n = num_train + num_test
    t = np.arange(length, dtype=np.float32)[None, :]
    y = rng.integers(0, 2, n)
    base = np.sin(2 * np.pi * t / rng.uniform(20, 40, (n, 1)) + rng.uniform(0, 2 * np.pi, (n, 1)))
    start = rng.integers(0, length - length // 4, (n, 1))
    window = (t >= start) & (t < start + length // 4)
    burst = 0.8 * np.sin(2 * np.pi * t / rng.uniform(4, 6, (n, 1))) * window * y[:, None]
    series = base + burst + rng.normal(0, 0.5, (n, length))
    series = (series - series.mean(1, keepdims=True)) / series.std(1, keepdims=True)
    return _split(series[..., None].astype(np.float32), y.astype(np.int64), num_train)
