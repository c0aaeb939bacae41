"""A random-access source over images given twice is refused (as arrays given to fit are)."""

import numpy as np
import pytest

from tan_keras.data import image_views


def test_augmented_images_refuse_an_image_given_twice_with_its_label():
    rng = np.random.default_rng(0)
    images = rng.random((16, 8, 8, 1)).astype("float32")
    labels = rng.integers(0, 3, 16)
    images[11], labels[11] = images[4], labels[4]
    with pytest.raises(ValueError, match=r"row 11 equals row 4"):
        image_views.AugmentedImages(images, labels, 2, "digits")
    image_views.AugmentedImages(images, labels, 2, "digits", repeated_rows="distinct_people")
    labels[11] = (labels[4] + 1) % 3  # power check: another label, another example
    image_views.AugmentedImages(images, labels, 2, "digits")
