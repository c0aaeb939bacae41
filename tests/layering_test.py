"""The package's layers: every import of a tan_keras module points down.

Layers, bottom to top (a module may import its own package and lower layers,
never a sibling or a higher layer, also not inside a function):
  base      tan_keras._validate, _numbers, _lazy, _stack, _keras_internals, _keras_saving,
            _startup, _cli, _fingerprints, _repeated_rows
  privacy   accounting, TAN, planning (no TensorFlow)
  analysis  scaling law, auditing (no TensorFlow)
  mechanism clipping, noise, sampling, views, per-example routes
  models    architectures; they register their layers' rules
  data      datasets, augmentations
  keras_dp  the Keras model, callbacks, checkpoints, input and model checks
  jax_dp    the Keras model on the JAX backend (no TensorFlow)
  training  the program as a library
  mains     python -m tan_keras.train / tan_keras.search
"""

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "tan_keras"

LAYERS = {
    "base": 0,
    "privacy": 1,
    "analysis": 1,
    "mechanism": 2,
    "models": 3,
    "data": 4,
    "keras_dp": 5,
    "jax_dp": 6,
    "training": 7,
    "mains": 8,
}
_BASE = {
    "_backend",
    "_validate",
    "_numbers",
    "_lazy",
    "_stack",
    "_keras_internals",
    "_keras_saving",
    "_startup",
    "_cli",
    "_private_files",
    "_fingerprints",
    "_repeated_rows",
    "__init__",
}
_MAINS = {"train", "search", "privacy.__main__"}
_NO_TENSORFLOW = ("privacy", "analysis")


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts)


def _layer(module: str) -> str:
    """The layer of a module named relative to tan_keras ("" for the root)."""
    if module in _MAINS:
        return "mains"
    head = module.split(".")[0]
    if head in _BASE or module == "":
        return "base"
    if head not in LAYERS:
        raise AssertionError(f"tan_keras.{module} is in no layer: add it to LAYERS")
    return head


def _imports(path: pathlib.Path):
    """(imported module relative to tan_keras, line, at module level) for each import."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "tan_keras":
                names = [f"tan_keras.{alias.name}" for alias in node.names]
            else:
                names = [node.module]
        for name in names:
            if name == "tan_keras" or name.startswith("tan_keras."):
                found.append((name[len("tan_keras.") :], node.lineno, id(node) in top_level))
    return found


def _violations(modules):
    bad = []
    for module, imports in modules.items():
        source = _layer(module)
        for target, line, _ in imports:
            layer = _layer(target)
            same_package = layer == source and source not in ("base", "mains")
            if same_package or LAYERS[layer] < LAYERS[source]:
                continue
            if source == "base" and layer == "base" and target != module:
                continue  # the base modules are leaves beside each other
            if source == "mains" and layer in ("base", "privacy"):
                continue
            bad.append(f"tan_keras.{module}:{line} ({source}) imports tan_keras.{target} ({layer})")
    return bad


def _package_imports():
    return {
        _module_name(path): _imports(path)
        for path in sorted(PACKAGE.rglob("*.py"))
        if "__pycache__" not in path.parts
    }


def test_every_import_points_down_the_layers():
    assert _violations(_package_imports()) == []


def test_layering_check_catches_an_upward_or_sideways_import():
    # Power check: the rule rejects the imports it exists to forbid.
    assert _violations({"mechanism.sampling": [("data.augment", 1, False)]})
    assert _violations({"privacy.tan": [("mechanism.noise", 1, True)]})
    assert _violations({"training.search_lib": [("train", 1, False)]})
    assert _violations({"analysis.scaling": [("privacy.tan", 1, True)]})
    assert not _violations({"keras_dp.dp_model": [("mechanism.noise", 1, True)]})


def test_module_level_imports_have_no_cycle():
    graph = {
        module: {t for t, _, top in imports if top and t != module}
        for module, imports in _package_imports().items()
    }
    # Imports of a package run its __init__: count them as edges to it.
    state = {}

    def visit(module, stack):
        state[module] = "open"
        for target in graph.get(module, ()):
            if state.get(target) == "open":
                pytest.fail("import cycle: " + " -> ".join(stack + [module, target]))
            if target not in state:
                visit(target, stack + [module])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [])


def _imported_names(node) -> list:
    """The modules an AST node imports (none for a node that is no import)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module:
        return [node.module]
    return []


@pytest.mark.parametrize("layer", _NO_TENSORFLOW)
def test_tensorflow_free_layers_import_no_tensorflow(layer):
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            for name in _imported_names(node):
                assert name.split(".")[0] not in ("tensorflow", "keras"), (
                    f"{path.name}:{node.lineno} imports {name}"
                )
                if name.startswith("tan_keras."):
                    assert _layer(name[len("tan_keras.") :]) in ("base", "privacy", "analysis")


# What the JAX backend's modules may import from the package: TensorFlow-free
# modules (the ledger imports TensorFlow only on the TensorFlow backend).
_JAX_MAY_IMPORT = (
    "data",  # its __init__: a docstring
    "data.image_views",
    "data.policies",
    "keras_dp",  # its __init__: a docstring
    "keras_dp.budget",
    "keras_dp.callback_checks",
    "keras_dp.callbacks",
    "keras_dp.dp_config",
    "keras_dp.ledger",
    "keras_dp.plain_training",
    "keras_dp.private_adapt",  # TensorFlow only for a tf.data pipeline, if loaded
    "mechanism",  # its __init__: a docstring
    "mechanism.captures",
    "mechanism.data_copies",  # TensorFlow on its backend only
    "mechanism.held_out",
    "mechanism.moments",
    "mechanism.not_private",
    "mechanism.provenance",
)


def _imports_tensorflow_unconditionally(tree) -> bool:
    """Whether a module imports TensorFlow other than under `if _TENSORFLOW:`."""
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "_TENSORFLOW":
            guarded |= {id(child) for child in ast.walk(node)}
    for node in ast.walk(tree):
        names = _imported_names(node)
        if id(node) not in guarded and any(n.split(".")[0] == "tensorflow" for n in names):
            return True
    return False


def _jax_violations(imports) -> list:
    """What the JAX backend would reach that it must not: a module not allowed, or TensorFlow."""
    bad, seen, todo = [], set(), [target for target, _, _ in imports]
    while todo:
        module = todo.pop()
        if module in seen or _layer(module) in ("base", "privacy") or module.startswith("jax_dp"):
            continue
        seen.add(module)
        if module not in _JAX_MAY_IMPORT:
            bad.append(f"tan_keras.{module} (not TensorFlow-free)")
            continue
        path = PACKAGE / (module.replace(".", "/") + ".py")
        if not path.exists():
            path = PACKAGE / module.replace(".", "/") / "__init__.py"
        if _imports_tensorflow_unconditionally(ast.parse(path.read_text())):
            bad.append(f"tan_keras.{module} imports TensorFlow")
        todo += [target for target, _, _ in _imports(path)]
    return bad


def test_the_jax_backend_imports_no_tensorflow_module():
    imports = [
        found
        for path in sorted((PACKAGE / "jax_dp").rglob("*.py"))
        for found in _imports(path)
        if not found[0].startswith("jax_dp")
    ]
    assert imports, "the walk starts from the JAX backend's imports"
    # And from the names `tan_keras` exports on the JAX backend.
    import tan_keras

    exported = set(tan_keras._JAX_EXPORTS.values())
    imports += [(m[len("tan_keras.") :], 0, False) for m in sorted(exported)]
    assert _jax_violations(imports) == []
    # Power checks: an import of the TensorFlow route is caught, and so is an
    # unguarded TensorFlow import.
    assert _jax_violations([("keras_dp.dp_model", 1, True)])
    assert _imports_tensorflow_unconditionally(ast.parse("import tensorflow as tf"))
    assert _imports_tensorflow_unconditionally(
        ast.parse("if _TENSORFLOW:\n    pass\nfrom tensorflow import nest")
    )
    assert not _imports_tensorflow_unconditionally(
        ast.parse("if _TENSORFLOW:\n    import tensorflow as tf")
    )


def _loads_tensorflow(modules) -> bool:
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules)
    code += "print('tensorflow' in sys.modules or 'keras' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return out.stdout.strip().splitlines()[-1] == "True"


def test_flags_plans_and_names_load_no_tensorflow():
    # A bad flag fails in a second: the program checks its flags, names and
    # privacy plan before TensorFlow loads.
    assert not _loads_tensorflow(
        [
            "tan_keras.privacy.cli",
            "tan_keras.training.train_flags",
            "tan_keras.training.train_plan",
            "tan_keras.models.names",
            "tan_keras.data.policies",
            "tan_keras.analysis.scaling",
        ]
    )
    assert _loads_tensorflow(["tan_keras.models.build"])  # power check


def test_model_layers_import_without_the_mechanism():
    # TF Privacy's baseline (benchmarks/) builds the same models on Keras 2:
    # the architectures import Keras alone, not the DP machinery's Keras 3
    # internals (their per-example rules live in tan_keras.models.layer_rules).
    code = (
        "import sys\nfrom tan_keras.models import build_model\n"
        "build_model('nf_resnet50', (32, 32, 3), 10)\n"
        "print(sorted(m for m in sys.modules if m.startswith('tan_keras.mechanism')"
        " or m == 'tan_keras._keras_internals'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"
