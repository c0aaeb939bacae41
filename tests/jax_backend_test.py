"""The JAX-backend suite (tests_jax/), run in its own process.

A process has one Keras backend, fixed when Keras is first imported; this
suite's process has the TensorFlow one. tests_jax/ sets KERAS_BACKEND=jax
and 4 virtual CPU devices before its first import. CI runs tests_jax/ in an
environment of its own (tan_keras[jax], no TensorFlow) and sets
TAN_KERAS_JAX_SUITE_APART=1 for the main suite, so that it runs once.
"""

import os
import pathlib
import subprocess
import sys

import pytest

SUITE = pathlib.Path(__file__).resolve().parent.parent / "tests_jax"


@pytest.mark.skipif(
    os.environ.get("TAN_KERAS_JAX_SUITE_APART") == "1",
    reason="run apart: CI runs tests_jax in its own tan_keras[jax] environment (.ci/run)",
)
def test_the_jax_backend_suite_passes():
    pytest.importorskip("jax")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["KERAS_BACKEND"] = "jax"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(SUITE)],
        capture_output=True,
        text=True,
        env=env,
        cwd=SUITE.parent,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout
