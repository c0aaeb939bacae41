"""The Colab TPU notebook is a valid notebook and, run here on CPU, trains privately.

Its code cells run in order in one namespace, as a kernel would run them
(IPython magics skipped), at the notebook's CPU scale, on the suite's 4
virtual CPU devices: so under the DataParallel distribution the notebook sets
when there are several devices, as on a TPU's cores.
"""

import contextlib
import io
import json
import pathlib
import re
import sys

import jax
import keras

NOTEBOOK = (
    pathlib.Path(__file__).resolve().parent.parent / "notebooks" / "tan_keras_colab_tpu.ipynb"
)


def _notebook():
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))


def _source(cell):
    source = cell["source"]
    return source if isinstance(source, str) else "".join(source)


def _code_cells(notebook):
    return [_source(cell) for cell in notebook["cells"] if cell["cell_type"] == "code"]


def _python(source):
    # Lines starting with % or ! are IPython magics (%pip install) or shell
    # commands: a kernel runs them, plain Python cannot; they are skipped here.
    return "\n".join(
        "" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines()
    )


def test_the_notebook_is_nbformat_4_without_outputs():
    notebook = _notebook()
    assert notebook["nbformat"] == 4
    assert isinstance(notebook["nbformat_minor"], int)
    assert isinstance(notebook["metadata"], dict)
    assert notebook["cells"]
    for cell in notebook["cells"]:
        assert cell["cell_type"] in ("markdown", "code"), cell["cell_type"]
        assert isinstance(cell["metadata"], dict)
        assert isinstance(cell["source"], (str, list))
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], "outputs are stored"
            assert cell["execution_count"] is None, "an execution count is stored"
        else:
            assert "outputs" not in cell and "execution_count" not in cell
    assert notebook["cells"][0]["cell_type"] == "markdown"


def test_it_installs_the_jax_extra_and_never_imports_tensorflow():
    code = _code_cells(_notebook())
    install = code[0]
    assert re.search(r'^%pip install -q "tan_keras\[jax\]"$', install, re.M), install
    # The backend is chosen before Keras is imported, in the install cell.
    assert re.search(r'^os\.environ\["KERAS_BACKEND"\] = "jax"', install, re.M), install
    assert "import keras" not in install
    for source in code:
        assert not re.search(r"^\s*(import|from)\s+tensorflow\b", source, re.M), source


def test_the_notebook_runs_on_cpu_and_trains_privately():
    # A Colab TPU runtime has no TensorFlow: running the notebook must not
    # import it (here it is installed; another test may have imported it).
    tensorflow_before = "tensorflow" in sys.modules
    out = io.StringIO()
    namespace = {"__name__": "colab_tpu_notebook"}
    with contextlib.redirect_stdout(out):
        for index, source in enumerate(_code_cells(_notebook())):
            exec(compile(_python(source), f"{NOTEBOOK}:code cell {index}", "exec"), namespace)
    assert tensorflow_before or "tensorflow" not in sys.modules
    # The suite's 4 devices: each step's rows were split over all of them.
    distribution = keras.distribution.distribution()
    assert isinstance(distribution, keras.distribution.DataParallel), distribution
    assert distribution.device_mesh.devices.size == jax.device_count() == 4
    printed = out.getvalue()
    assert "SCALE=cpu" in printed, printed
    line = printed.strip().splitlines()[-1]
    match = re.fullmatch(
        r"epsilon=([\d.]+) delta=1e-05 updates=(\d+) EMA test accuracy=([\d.]+)", line
    )
    assert match, line
    epsilon, updates, accuracy = float(match[1]), int(match[2]), float(match[3])
    assert epsilon <= 8.0 and namespace["accountant"].epsilon() <= 8.0
    assert updates == namespace["STEPS"]
    assert accuracy > 0.6  # 10 classes: chance is 0.1 (0.84 to 0.88 measured)
