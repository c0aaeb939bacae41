"""The generated reviews: deterministic, balanced, and word order matters."""

import numpy as np
import pytest

from tan_keras.data import synthetic_text as text


def test_same_seed_same_reviews_and_balanced_labels():
    a, b = text.make_reviews(seed=3), text.make_reviews(seed=3)
    np.testing.assert_array_equal(a.train_x, b.train_x)
    np.testing.assert_array_equal(a.test_y, b.test_y)
    assert a.train_x.shape == (4000, 12) and a.train_x.dtype == np.int32
    assert 0.45 < a.train_y.mean() < 0.55
    assert a.train_x.min() >= 1 and a.train_x.max() < 48  # id 0 stays free for padding
    assert not np.array_equal(a.train_x, text.make_reviews(seed=4).train_x)


def test_labels_follow_the_score_and_not_flips_the_next_word():
    good, bad, neutral = text.POSITIVE[0], text.NEGATIVE[0], 30
    reviews = np.array(
        [
            [good, neutral, neutral],
            [text.NOT, good, neutral],  # "not good": negative
            [bad, text.NOT, bad],  # -1 + 1
            [good, text.NOT, neutral],  # "not" before a neutral word changes nothing
        ]
    )
    np.testing.assert_array_equal(text.sentiment(reviews), [1, -1, 0, 1])
    data = text.make_reviews(num_train=500, num_test=10)
    np.testing.assert_array_equal(data.train_y, (text.sentiment(data.train_x) > 0))


def test_word_order_matters():
    # The same words in another order can change the label: a model must
    # read the order (the README's LSTM does), a bag of words cannot.
    data = text.make_reviews(num_train=2000, num_test=10)
    shuffled = np.random.default_rng(0).permuted(data.train_x, axis=1)
    changed = np.mean((text.sentiment(shuffled) > 0) != data.train_y.astype(bool))
    assert changed > 0.1


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_train": 0}, "num_train"),
        ({"length": 1}, "length"),
        ({"vocab_size": 10}, "vocab_size"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, name):
    with pytest.raises(ValueError, match=f"Invalid value for `{name}`"):
        text.make_reviews(**kwargs)
