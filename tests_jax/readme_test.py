"""The README's first example, in its JAX form, runs as written and learns privately."""

import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _example_code(marker):
    text = README.read_text(encoding="utf-8")
    block = text.split(f"<!-- {marker}:start -->")[1].split(f"<!-- {marker}:end -->")[0]
    return block.split("```python")[1].split("```")[0]


def test_the_jax_example_runs_and_learns_privately():
    out = io.StringIO()
    namespace = {"__name__": "readme_jax_example"}
    with contextlib.redirect_stdout(out):
        exec(compile(_example_code("readme-jax-example"), str(README), "exec"), namespace)
    line = out.getvalue().strip().splitlines()[-1]
    match = re.fullmatch(
        r"epsilon=([\d.]+) delta=0.0001 updates=(\d+) EMA test accuracy=([\d.]+)", line
    )
    assert match, line
    epsilon, updates, accuracy = float(match[1]), int(match[2]), float(match[3])
    assert epsilon <= 8.0
    assert updates == namespace["STEPS"]
    assert accuracy > 0.8  # 10 classes: chance is 0.1
