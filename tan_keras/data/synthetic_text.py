"""A generated text-classification task: short "reviews" as token ids.

Made here, offline and deterministic by seed, so the text example and its
tests need no download. Each review is `length` tokens from a vocabulary of
`vocab_size`: id 1 is "not", ids 2-9 are positive words, 10-17 negative
words, the rest neutral. Its label is 1 when its sentiment is positive: the
sum of its words' polarities, where "not" flips the polarity of the word
that follows it. Word order matters (a bag of words cannot see which word a
"not" negates), which makes the task a fair one for a recurrent model.
"""

from typing import Tuple

import numpy as np

from tan_keras import _validate
from tan_keras.data.datasets import ArrayDataset

NOT = 1
POSITIVE = tuple(range(2, 10))
NEGATIVE = tuple(range(10, 18))
_FIRST_NEUTRAL = 18


def make_reviews(
    num_train: int = 4000,
    num_test: int = 1000,
    length: int = 12,
    vocab_size: int = 48,
    seed: int = 0,
) -> ArrayDataset:
    """Generates labelled reviews (token ids) with a fixed train/test split.

    Args:
      num_train: Training reviews, an integer >= 1.
      num_test: Test reviews, an integer >= 1.
      length: Tokens per review, an integer >= 2.
      vocab_size: Vocabulary size, an integer >= 20 (ids 0..vocab_size-1;
        id 0 is never drawn, so it can serve as padding).
      seed: Seed; the same arguments always give the same reviews.

    Returns:
      An `ArrayDataset` with int32 token ids of shape (n, length), int32
      labels in {0, 1} (about balanced) and `num_classes` 2.

    Raises:
      ValueError: if an argument is out of range.
    """
    num_train = _validate.positive_int("num_train", num_train)
    num_test = _validate.positive_int("num_test", num_test)
    length = _validate.integer("length", length, low=2)
    vocab_size = _validate.integer("vocab_size", vocab_size, low=_FIRST_NEUTRAL + 2)
    seed = _validate.integer("seed", seed, low=0)
    rng = np.random.default_rng(seed)
    x, y = _reviews(rng, num_train + num_test, length, vocab_size)
    return ArrayDataset(
        x[:num_train], y[:num_train], x[num_train:], y[num_train:], num_classes=2, name="reviews"
    )


def sentiment(tokens: np.ndarray) -> np.ndarray:
    """The sentiment score of each review: polarities, flipped after "not".

    Args:
      tokens: int [n, length] token ids.

    Returns:
      int [n] scores; a review is positive when its score is > 0.
    """
    tokens = np.asarray(tokens)
    polarity = np.isin(tokens, POSITIVE).astype(np.int64) - np.isin(tokens, NEGATIVE)
    negated = np.zeros_like(polarity, dtype=bool)
    negated[:, 1:] = tokens[:, :-1] == NOT
    return np.where(negated, -polarity, polarity).sum(axis=1)


def _reviews(rng, n: int, length: int, vocab_size: int) -> Tuple[np.ndarray, np.ndarray]:
    kept_x, kept_y, have = [], [], 0
    while have < n:
        draw = rng.random((2 * n, length))
        tokens = rng.integers(_FIRST_NEUTRAL, vocab_size, (2 * n, length))
        tokens = np.where(draw < 0.3, rng.choice(POSITIVE + NEGATIVE, (2 * n, length)), tokens)
        tokens = np.where(draw > 0.88, NOT, tokens)
        score = sentiment(tokens)
        keep = score != 0  # no ties: every review has a side
        kept_x.append(tokens[keep])
        kept_y.append((score[keep] > 0).astype(np.int32))
        have += int(keep.sum())
    return (
        np.concatenate(kept_x)[:n].astype(np.int32),
        np.concatenate(kept_y)[:n],
    )
