"""The shared DP-core behaviour (`tests/_shared_behaviour.py`) on the JAX backend.

`tests/shared_behaviour_test.py` collects the same cases on TensorFlow.
"""

import os
import sys

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
)

from _shared_behaviour import *  # noqa: E402,F401,F403
