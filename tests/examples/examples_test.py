"""The first-day workflows of `examples/`: each private port is its keras.io-style code
plus at most 3 changed lines, and runs (a few steps on a small draw of its data).

The accuracies in the README come from `python examples/measure.py`, the full
runs (12,000 examples each), too long for the suite.
"""

import ast
import difflib
import importlib
import pathlib
import re
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"
WORKFLOWS = (
    "structured_data",
    "text",
    "image_augmentation",
    "transfer_learning",
    "subclassed_callbacks",
    "time_series",
)


def _code_lines(path):
    """The file's lines without its module docstring (which says private or not)."""
    source = path.read_text()
    docstring = ast.parse(source).body[0]
    lines = source.splitlines()
    return lines[docstring.end_lineno :]


def _changed_lines(name):
    before = _code_lines(EXAMPLES / f"{name}_keras.py")
    after = _code_lines(EXAMPLES / f"{name}_private.py")
    matcher = difflib.SequenceMatcher(a=before, b=after, autojunk=False)
    return sum(
        max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in matcher.get_opcodes() if tag != "equal"
    )


@pytest.mark.parametrize("name", WORKFLOWS)
def test_the_private_port_changes_at_most_three_lines(name):
    assert 1 <= _changed_lines(name) <= 3
    private = (EXAMPLES / f"{name}_private.py").read_text()
    assert "make_private_with_epsilon(" in private and "target_epsilon=8" in private


def test_the_line_count_sees_a_fourth_change():
    # Power check of the count itself: one more changed line is seen.
    before = _code_lines(EXAMPLES / "text_keras.py")
    after = list(before)
    for edit in range(4):
        after[edit] = after[edit] + "  # changed"
    matcher = difflib.SequenceMatcher(a=before, b=after, autojunk=False)
    assert sum(max(o[2] - o[1], o[4] - o[3]) for o in matcher.get_opcodes() if o[0] != "equal") == 4


@pytest.fixture
def examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    yield
    for name in list(sys.modules):
        if name.endswith(("_keras", "_private")) or name == "pretrained":
            if getattr(sys.modules[name], "__file__", "") and str(EXAMPLES) in str(
                sys.modules[name].__file__
            ):
                del sys.modules[name]


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("structured_data", dict(epochs=1)),
        ("text", dict(epochs=1, kind="transformer")),
        ("image_augmentation", dict(epochs=1)),
        ("transfer_learning", dict(epochs=(1, 1))),
        ("subclassed_callbacks", dict(epochs=2)),
        ("time_series", dict(epochs=1)),
    ],
)
def test_the_private_port_runs_at_epsilon_8(name, kwargs, examples_on_path, monkeypatch, capsys):
    if name == "transfer_learning":
        pretrained = importlib.import_module("pretrained")
        small = pretrained.mobilenet_v2_base
        monkeypatch.setattr(pretrained, "mobilenet_v2_base", lambda: small(200, 1))
    module = importlib.import_module(f"{name}_private")
    accuracy = module.main(train_size=400, verbose=0, **kwargs)
    printed = capsys.readouterr().out
    assert 0.0 <= accuracy <= 1.0
    # The plan: calibrated for epsilon 8, with any earlier release composed.
    assert re.search(r"for target_eps 8\n|compose to epsilon [0-9.]+ <= 8\.", printed)
