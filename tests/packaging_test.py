"""What `pip install` gives: the base install and the backend extras.

The base install must hold what every backend needs and nothing of
TensorFlow, so that `tan_keras[jax]` installs no TensorFlow (CI installs it
alone and runs the JAX suite in it); the TensorFlow route comes with
`tan_keras[tensorflow]`, and without TensorFlow its names say so.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

tomllib = pytest.importorskip("tomllib")

_PYPROJECT = pathlib.Path(__file__).resolve().parent.parent / "pyproject.toml"
# Distributions that are TensorFlow or need it.
_TENSORFLOW = re.compile(r"^(tensorflow|tensorflow-.*|tf-.*|tf_.*|tensorboard.*)$")


def _project():
    return tomllib.loads(_PYPROJECT.read_text(encoding="utf-8"))["project"]


def _names(requirements):
    return [re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower() for r in requirements]


def test_the_base_install_and_the_jax_extra_hold_no_tensorflow():
    project = _project()
    extras = project["optional-dependencies"]
    jax_install = _names(project["dependencies"] + extras["jax"])
    assert "keras" in jax_install and "jax" in jax_install
    assert not [name for name in jax_install if _TENSORFLOW.match(name)]
    # Power check: the pattern finds TensorFlow where it is.
    tensorflow_install = _names(extras["tensorflow"])
    assert "tensorflow" in tensorflow_install
    assert [name for name in tensorflow_install if _TENSORFLOW.match(name)]


_WITHOUT_TENSORFLOW = """
import sys

class NoTensorFlow:
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "tensorflow":
            raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")
        return None

sys.meta_path.insert(0, NoTensorFlow())
import tan_keras
tan_keras.DPKerasModel
"""


def test_without_tensorflow_the_tensorflow_route_names_the_extra_to_install():
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TENSORFLOW],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert 'pip install "tan_keras[tensorflow]"' in result.stderr
    assert 'pip install "tan_keras[jax]"' in result.stderr
