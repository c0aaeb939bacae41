"""The JAX-backend suite: Keras on JAX, 4 virtual CPU devices, no TensorFlow.

Run it on its own (`python -m pytest tests_jax`); `tests/jax_backend_test.py`
does so in a subprocess, since a process has one Keras backend. The
environment is set here, before anything imports Keras or JAX.
"""

import os

os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import keras  # noqa: E402
import pytest  # noqa: E402

# Many tests compile the same small steps: XLA's persistent cache, in a
# directory of this run's process only, compiles each program once (the
# suite on 2 cores: 4:33 with it, 5:35 without).
_CACHE_DIR = tempfile.mkdtemp(prefix="tan_keras_jax_cache_")
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _forget_remembered_values():
    from tan_keras.keras_dp import ledger

    ledger._REMEMBERED.clear()
    ledger._LOADED.clear()


@pytest.fixture(autouse=True)
def _forget_remembered_weights():
    """Each test starts, and leaves, with no weight values remembered (ledger.py).

    Forgotten at the end too: a module fixture is built before any function
    fixture, and must not see what the previous test remembered.
    """
    _forget_remembered_values()
    yield
    _forget_remembered_values()


@pytest.fixture(autouse=True)
def _no_distribution():
    keras.distribution.set_distribution(None)
    yield
    keras.distribution.set_distribution(None)


# Parameter variants left out of the default run (CI's 20 minutes on 2
# cores), each beside a variant checking the same property (in brackets);
# TAN_KERAS_SLOW_TESTS=1 runs them too, as for tests/.
SLOW_TESTS = {
    # [("cnn", 2): several views; ("mlp", 1), ("text", 1), ("convs", 1): those models]
    "tests_jax/ghost_norms_test.py::test_ghost_kernels_give_the_per_example_routes_clipped_sum[mlp-3]",
    "tests_jax/ghost_norms_test.py::test_ghost_kernels_give_the_per_example_routes_clipped_sum[text-2]",
    "tests_jax/ghost_norms_test.py::test_ghost_kernels_give_the_per_example_routes_clipped_sum[convs-2]",
    # [4 devices: the same equality, the shard_map over more of them]
    "tests_jax/dp_step_test.py::test_several_devices_equal_one_on_convolutions[2]",
}


def pytest_collection_modifyitems(config, items):
    if os.environ.get("TAN_KERAS_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="slow variant: set TAN_KERAS_SLOW_TESTS=1")
    for item in items:
        if item.nodeid in SLOW_TESTS:
            item.add_marker(skip)
