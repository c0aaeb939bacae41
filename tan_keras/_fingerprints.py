"""Fingerprints of array values: what the privacy ledger recognises copies by.

A TensorFlow-free base module: the ledger (`keras_dp/ledger.py`) runs on
both Keras backends, and the data checks (`mechanism/data_copies.py`) use
the same hash.
"""

import hashlib
from typing import Any

import numpy as np


def value_fingerprint(value: Any) -> int:
    """A 64-bit hash of an array's values as float64, in any dtype or shape.

    Args:
      value: An array-like (numbers, or strings: then its own bytes).

    Returns:
      The fingerprint, an int in [0, 2**64).
    """
    value = np.asarray(value)
    try:
        canonical = np.asarray(value, np.float64).ravel()
    except (TypeError, ValueError):
        # Not numbers (a string table): its own bytes.
        canonical = np.asarray(value).ravel()
    digest = hashlib.blake2b(str(canonical.dtype).encode(), digest_size=8)
    digest.update(canonical.tobytes())
    return int.from_bytes(digest.digest(), "little")
