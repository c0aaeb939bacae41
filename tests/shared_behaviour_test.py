"""The shared DP-core behaviour (`_shared_behaviour.py`) on the TensorFlow backend.

`tests_jax/shared_behaviour_test.py` collects the same cases on JAX.
"""

from _shared_behaviour import *  # noqa: F401,F403
