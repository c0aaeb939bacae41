"""The content digest's modular powers equal Python's, in graphs, with XLA and without."""

import numpy as np
import pytest
import tensorflow as tf

from tan_keras.mechanism import content_digest

PRIME = content_digest._PRIME


@pytest.mark.parametrize("count", [1, 2, 37, 1000])
def test_powers_equal_python_s_modular_powers(count):
    rng = np.random.default_rng(count)
    for point in (1, PRIME - 1, int(rng.integers(2, PRIME))):
        expected = [pow(point, e, PRIME) for e in range(1, count + 1)]
        known = content_digest._powers(tf.constant(point, tf.int64), count)
        # A width known only when the step runs takes the 32-bit path.
        unknown = content_digest._powers(tf.constant(point, tf.int64), tf.constant(count))
        assert known.numpy().tolist() == expected
        assert unknown.numpy().tolist() == expected


def test_powers_under_xla_equal_python_s():
    @tf.function(jit_compile=True)
    def powers(point):
        return content_digest._powers(point, 37)

    point = 123456789
    assert powers(tf.constant(point, tf.int64)).numpy().tolist() == [
        pow(point, e, PRIME) for e in range(1, 38)
    ]
