"""twins_tf's modules import one way: each layer only from itself and the layers below it.

Data flows from the checks and layers up through models, attacks and the trainer to a run,
its evaluation, interpolation and comparison (design.md); a lower module importing a higher
one would tie the pieces a library user composes to the ones built on top of them.  The
binaries (`python -m twins_tf.<name>`) sit above everything and never import each other: a
binary parses flags and calls the library, so what one binary needs from another belongs in
the library.

Every `import` counts, including the ones inside functions (kept there to stay light at
import time, but still dependencies).  `import twins_tf` itself is allowed anywhere: every
submodule import runs the package's `__init__` first, so it adds no dependency.  The source
is read with `ast`; nothing is imported.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).absolute().parent.parent / "twins_tf"

# Lowest first.  A unit is a top-level module or subpackage of twins_tf.
LAYERS = (
    ("platform", "methods", "input_checks"),
    ("layers",),
    ("bn_wings",),
    ("twinify", "models"),
    ("weights", "data", "attacks", "lora", "accuracy"),
    ("autolora",),
    ("trainer",),
    ("training",),
    ("evaluation", "serving"),
    ("interpolation",),
    ("comparison",),
)
BINARIES = ("train", "pretrain", "evaluate", "convert", "export", "compare", "interpolate", "demo")
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
RANK.update({binary: len(LAYERS) for binary in BINARIES})


def unit_of(module):
    """`twins_tf.training.loop` -> `training`; `twins_tf` -> None (the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def module_files():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        yield ".".join(parts), path


def imported_units(path):
    """(line, twins_tf unit) for every import of a twins_tf module in the file."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "twins_tf":  # `from twins_tf import x`: x is the unit
                names = [f"twins_tf.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "twins_tf" and unit_of(name):
                yield node.lineno, unit_of(name)


def layering_problems():
    problems = []
    for module, path in module_files():
        unit = unit_of(module)
        if unit is None:
            continue  # the package's __init__ is the public surface over all layers
        assert unit in RANK, f"{module}: add its unit {unit!r} to LAYERS or BINARIES"
        for line, imported in imported_units(path):
            if imported == unit or imported not in RANK:
                continue
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            if unit in BINARIES and imported in BINARIES:
                problems.append(f"{where}: the binary {unit} imports the binary {imported}")
            elif RANK[imported] > RANK[unit]:
                problems.append(f"{where}: {unit} imports the higher layer {imported}")
    return problems


def test_every_unit_has_a_layer():
    units = {unit_of(module) for module, _ in module_files()} - {None}
    assert units <= set(RANK), f"not placed in LAYERS or BINARIES: {sorted(units - set(RANK))}"


def test_no_module_imports_a_higher_layer_or_another_binary():
    problems = layering_problems()
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from twins_tf.training import loop\n", "layers imports the higher layer training"),
        ("def f():\n    from twins_tf import comparison\n", "imports the higher layer comparison"),
    ],
)
def test_an_upward_import_is_reported(tmp_path, monkeypatch, source, expected):
    fake = tmp_path / "twins_tf"
    fake.mkdir()
    (fake / "layers.py").write_text(source)
    monkeypatch.setitem(globals(), "PACKAGE", fake)
    problems = layering_problems()
    assert len(problems) == 1 and expected in problems[0], problems


def test_a_binary_importing_a_binary_is_reported(tmp_path, monkeypatch):
    fake = tmp_path / "twins_tf"
    fake.mkdir()
    (fake / "pretrain.py").write_text("from twins_tf import train\n")
    monkeypatch.setitem(globals(), "PACKAGE", fake)
    problems = layering_problems()
    assert len(problems) == 1 and "the binary pretrain imports the binary train" in problems[0]
