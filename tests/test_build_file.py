"""BUILD must name every module, test and binary of the tree, with the twins_tf deps they import.

Bazel targets are written by hand while other people add modules, so BUILD drifts unless
something checks it. This test derives the targets BUILD must have from the source tree alone
(file paths, `import` statements, `if __name__ == "__main__":` guards) and compares them with
the targets BUILD declares; each failure names the stanza to paste. BUILD's syntax is a subset
of Python's, so `ast` parses it; nothing is evaluated and TensorFlow is not imported.

Conventions it enforces (see the header of BUILD):
  * every `twins_tf/**/*.py` and every helper `tests/*.py` (conftest.py, torch_resnet.py, ...)
    has `py_library(name = <dotted module>, srcs = [<its file>])`;
  * every `tests/test_*.py` has `pytest_test(name = <file stem>)`;
  * every twins_tf module with a `__main__` guard has `py_binary(name = <file stem>,
    srcs = [<its file>], main = <its file>)` depending on its library;
  * deps hold every twins_tf module (or tests helper) the file imports, and the packages above
    it; a library leaves out the packages that contain it (their `__init__.py` may import it,
    and Bazel forbids cycles). Extra deps are allowed: lazy imports the parser cannot see
    (`importlib.import_module(f"...")`) need them.
"""

import ast
import dataclasses
import pathlib
import textwrap

import pytest

REPO_ROOT = pathlib.Path(__file__).absolute().parent.parent  # absolute(): keep Bazel's runfiles
PACKAGE_DIR = "twins_tf"
TESTS_DIR = "tests"
TEST_MACRO = "pytest_test"
TEST_MACRO_IMPLICIT_DEPS = ("tests.conftest",)


@dataclasses.dataclass
class Target:
    """One rule call in BUILD: its kind and the attributes this check reads."""

    kind: str
    name: str
    srcs: list
    deps: list
    main: str = None


def module_name(relative_path):
    """The dotted name of a file: `twins_tf/attacks/__init__.py` -> `twins_tf.attacks`."""
    parts = list(pathlib.PurePosixPath(relative_path).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def ancestors(module):
    """`a.b.c` -> [`a`, `a.b`]."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def source_files(root):
    """Relative paths of the package's modules and of the tests' Python files."""
    package = sorted(p.relative_to(root).as_posix() for p in (root / PACKAGE_DIR).rglob("*.py"))
    tests = sorted(p.relative_to(root).as_posix() for p in (root / TESTS_DIR).glob("*.py"))
    return package, tests


def imported_modules(path, module, known_modules):
    """The known modules that the file at `path` (module `module`) imports, statically.

    Counts `import x.y`, `from x import y` (y a module or a name), relative imports, bare
    imports of sibling test helpers (pytest puts tests/ on sys.path) and string constants that
    are exactly a known module's name (the lazy `_EXPORTS` tables of package `__init__`s).
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    in_tests = module.startswith(TESTS_DIR + ".")
    found = set()

    def add(name):
        if in_tests and f"{TESTS_DIR}.{name}" in known_modules:
            name = f"{TESTS_DIR}.{name}"
        if name in known_modules:
            found.add(name)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module
            add(base)
            for alias in node.names:
                add(f"{base}.{alias.name}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value in known_modules and node.value != module:
                found.add(node.value)
    return found


def required_deps(imports, known_modules, module=None):
    """Targets a consumer of `imports` must list; `module` set means a library inside packages."""
    closure = set(imports)
    for name in imports:
        closure.update(ancestors(name))
    if module is not None:
        closure -= set(ancestors(module)) | {module}
    return closure & known_modules


def has_main_guard(path):
    """True when the file has a top-level `if __name__ == "__main__":`, i.e. it is a binary."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare):
            names = [n for n in [node.test.left, *node.test.comparators] if isinstance(n, ast.Name)]
            constants = [n.value for n in node.test.comparators if isinstance(n, ast.Constant)]
            if names and names[0].id == "__name__" and "__main__" in constants:
                return True
    return False


def _string_list(node, what):
    if isinstance(node, ast.List) and all(isinstance(e, ast.Constant) for e in node.elts):
        return [e.value for e in node.elts]
    raise ValueError(f"BUILD: {what} must be a plain list of strings for this check to read it")


def label_name(label):
    """`:x`, `//:x` -> `x`; labels of other packages are returned whole."""
    if label.startswith("//:"):
        return label[3:]
    if label.startswith(":"):
        return label[1:]
    return label


def parse_build(text):
    """The py_library, py_binary and pytest_test calls of a BUILD file, by name."""
    targets = {}
    for statement in ast.parse(text, filename="BUILD").body:
        call = statement.value if isinstance(statement, ast.Expr) else None
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)):
            continue
        kind = call.func.id
        if kind not in ("py_library", "py_binary", "py_test", TEST_MACRO):
            continue
        attrs = {keyword.arg: keyword.value for keyword in call.keywords}
        name = attrs["name"].value
        srcs = _string_list(attrs["srcs"], f"{name}.srcs") if "srcs" in attrs else []
        deps = _string_list(attrs["deps"], f"{name}.deps") if "deps" in attrs else []
        main = attrs["main"].value if "main" in attrs else None
        if name in targets:
            raise ValueError(f"BUILD: target {name!r} is declared twice")
        targets[name] = Target(kind, name, srcs, [label_name(d) for d in deps], main)
    return targets


def _stanza(kind, name, srcs=None, main=None, deps=()):
    lines = [f"{kind}(", f'    name = "{name}",']
    if srcs:
        lines.append(f'    srcs = ["{srcs}"],')
    if main:
        lines.append(f'    main = "{main}",')
    if deps:
        lines.append("    deps = [")
        lines += [f'        ":{dep}",' for dep in sorted(deps)]
        lines.append("    ],")
    lines.append(")")
    return "\n".join(lines)


def build_problems(root):
    """Every way BUILD under `root` disagrees with the source tree, as readable messages."""
    targets = parse_build((root / "BUILD").read_text())
    package_files, test_dir_files = source_files(root)
    library_files = package_files + [f for f in test_dir_files if not _is_test_file(f)]
    known_modules = {module_name(f) for f in library_files}
    problems = []

    def check_deps(target, needed, stanza):
        missing = needed - set(target.deps)
        if missing:
            problems.append(
                f"{target.kind} {target.name!r} lacks deps {sorted(missing)}; expected:\n{stanza}"
            )

    for path in library_files:
        module = module_name(path)
        imports = imported_modules(root / path, module, known_modules)
        top_level = module.startswith(TESTS_DIR + ".")
        needed = required_deps(imports, known_modules, None if top_level else module)
        stanza = _stanza("py_library", module, srcs=path, deps=needed)
        target = targets.get(module)
        if target is None or target.kind != "py_library":
            problems.append(f"no py_library for {path}; add:\n{stanza}")
            continue
        if target.srcs != [path]:
            problems.append(f"py_library {module!r} must have srcs = [{path!r}], not {target.srcs}")
        check_deps(target, needed, stanza)
        if path.startswith(PACKAGE_DIR + "/") and has_main_guard(root / path):
            binary_name = pathlib.PurePosixPath(path).stem
            binary_needed = required_deps({module}, known_modules)
            binary_stanza = _stanza(
                "py_binary", binary_name, srcs=path, main=path, deps=binary_needed
            )
            binary = targets.get(binary_name)
            if binary is None or binary.kind != "py_binary":
                problems.append(
                    f"no py_binary for {path} (it has a __main__ guard); add:\n{binary_stanza}"
                )
            else:
                if binary.srcs != [path] or binary.main != path:
                    problems.append(
                        f"py_binary {binary_name!r} must have srcs = [{path!r}] and main = {path!r}"
                    )
                check_deps(binary, binary_needed, binary_stanza)

    for path in test_dir_files:
        if not _is_test_file(path):
            continue
        name = pathlib.PurePosixPath(path).stem
        imports = imported_modules(root / path, module_name(path), known_modules)
        needed = required_deps(imports, known_modules) - set(TEST_MACRO_IMPLICIT_DEPS)
        stanza = _stanza(TEST_MACRO, name, deps=needed)
        target = targets.get(name)
        if target is None or target.kind != TEST_MACRO:
            problems.append(f"no {TEST_MACRO} for {path}; add:\n{stanza}")
            continue
        check_deps(target, needed, stanza)

    for target in targets.values():
        files = list(target.srcs) + ([target.main] if target.main else [])
        if target.kind == TEST_MACRO:
            files.append(f"{TESTS_DIR}/{target.name}.py")
        for file in files:
            if not (root / file).is_file():
                problems.append(f"{target.kind} {target.name!r} names {file}, which does not exist")
        for dep in target.deps:
            if ":" not in dep and "/" not in dep and dep not in targets:
                problems.append(
                    f"{target.kind} {target.name!r} depends on {dep!r}, "
                    "which BUILD does not declare"
                )
    return problems


def _is_test_file(path):
    return pathlib.PurePosixPath(path).name.startswith("test_")


def test_build_file_matches_source_tree():
    problems = build_problems(REPO_ROOT)
    assert not problems, "BUILD is out of date:\n\n" + "\n\n".join(problems)


# The check above passes on a correct BUILD; the cases below show it fails on a wrong one.


def _write(root, files):
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(textwrap.dedent(text))


_TOY_SOURCES = {
    "twins_tf/__init__.py": "from twins_tf.layers import Twin\n",
    "twins_tf/layers.py": "import keras\n",
    "twins_tf/models/__init__.py": "from .resnet import build\n",
    "twins_tf/models/resnet.py": "from twins_tf import layers\n",
    "twins_tf/train.py": (
        "from twins_tf.models import resnet\n"
        "def main():\n    pass\n"
        "if __name__ == '__main__':\n    main()\n"
    ),
    "tests/conftest.py": "import os\n",
    "tests/helper.py": "import numpy\n",
    "tests/test_models.py": "import helper\nfrom twins_tf.models.resnet import build\n",
}

_TOY_BUILD = """\
load("//tools/bazel_defs:pytest.bzl", "pytest_test")

py_library(name = "twins_tf", srcs = ["twins_tf/__init__.py"], deps = [":twins_tf.layers"])
py_library(name = "twins_tf.layers", srcs = ["twins_tf/layers.py"])
py_library(name = "twins_tf.models", srcs = ["twins_tf/models/__init__.py"],
           deps = [":twins_tf.models.resnet"])
py_library(name = "twins_tf.models.resnet", srcs = ["twins_tf/models/resnet.py"],
           deps = [":twins_tf.layers"])
py_library(name = "twins_tf.train", srcs = ["twins_tf/train.py"],
           deps = [":twins_tf.models", ":twins_tf.models.resnet"])
py_binary(name = "train", srcs = ["twins_tf/train.py"], main = "twins_tf/train.py",
          deps = [":twins_tf", ":twins_tf.train"])
py_library(name = "tests.conftest", srcs = ["tests/conftest.py"])
py_library(name = "tests.helper", srcs = ["tests/helper.py"])
pytest_test(name = "test_models", deps = [
    ":tests.helper", ":twins_tf", ":twins_tf.models", ":twins_tf.models.resnet"])
"""


@pytest.fixture
def toy_repo(tmp_path):
    _write(tmp_path, _TOY_SOURCES)
    (tmp_path / "BUILD").write_text(_TOY_BUILD)
    return tmp_path


def test_toy_repo_with_complete_build_passes(toy_repo):
    assert build_problems(toy_repo) == []


@pytest.mark.parametrize(
    "edit, expected",
    [
        # A module without a library.
        (
            lambda b: b.replace(
                'py_library(name = "tests.helper", srcs = ["tests/helper.py"])\n', ""
            ),
            "no py_library for tests/helper.py",
        ),
        # A test file without a test target.
        (
            lambda b: b.replace('pytest_test(name = "test_models"', 'py_library(name = "x"'),
            "no pytest_test for tests/test_models.py",
        ),
        # A binary without py_binary.
        (
            lambda b: b.replace('py_binary(name = "train"', 'py_library(name = "not_a_binary"'),
            "no py_binary for twins_tf/train.py",
        ),
        # A relative import (models/__init__ -> resnet) missing from deps.
        (
            lambda b: b.replace('deps = [":twins_tf.models.resnet"])', "deps = [])"),
            "py_library 'twins_tf.models' lacks deps ['twins_tf.models.resnet']",
        ),
        # The package of an imported module (twins_tf.models) missing from a test.
        (
            lambda b: b.replace(
                '":twins_tf.models", ":twins_tf.models.resnet"])', '":twins_tf.models.resnet"])'
            ),
            "pytest_test 'test_models' lacks deps ['twins_tf.models']",
        ),
        # A sibling helper imported bare (`import helper`) missing from a test.
        (
            lambda b: b.replace('":tests.helper", ', ""),
            "pytest_test 'test_models' lacks deps ['tests.helper']",
        ),
        # A target naming a file that is not there.
        (
            lambda b: b + 'py_library(name = "twins_tf.gone", srcs = ["twins_tf/gone.py"])\n',
            "names twins_tf/gone.py, which does not exist",
        ),
        # A dep on a target BUILD does not declare.
        (
            lambda b: b.replace(
                'deps = [":twins_tf.layers"])\npy_library(name = "twins_tf.layers"',
                'deps = [":twins_tf.layers", ":nowhere"])\npy_library(name = "twins_tf.layers"',
            ),
            "depends on 'nowhere', which BUILD does not declare",
        ),
    ],
)
def test_wrong_build_is_reported(toy_repo, edit, expected):
    build = toy_repo / "BUILD"
    edited = edit(build.read_text())
    assert edited != build.read_text(), "the edit did not apply: fix the test case"
    build.write_text(edited)
    problems = build_problems(toy_repo)
    assert any(expected in problem for problem in problems), problems


def test_library_leaves_out_its_own_packages():
    # resnet.py sits inside pkg.models, whose __init__ imports it: depending on the package
    # would be a cycle, so only the imported module itself is required. (Module names here
    # are not twins_tf's, so this file's own strings do not count as imports of twins_tf.)
    known = {"pkg", "pkg.layers", "pkg.models", "pkg.models.resnet"}
    assert required_deps({"pkg.layers"}, known, "pkg.models.resnet") == {"pkg.layers"}
    assert required_deps({"pkg.layers"}, known) == {"pkg", "pkg.layers"}


def test_lazy_export_tables_count_as_imports(tmp_path):
    path = tmp_path / "__init__.py"
    path.write_text('_EXPORTS = {"PGD": "pkg.attacks.pgd"}\n"""Mentions pkg.attacks.fab."""\n')
    known = {"pkg.attacks", "pkg.attacks.pgd", "pkg.attacks.fab"}
    assert imported_modules(path, "pkg.attacks", known) == {"pkg.attacks.pgd"}


if __name__ == "__main__":
    # `python tests/test_build_file.py` lists what BUILD lacks, with the stanzas to paste.
    found = build_problems(REPO_ROOT)
    print("\n\n".join(found) or "BUILD matches the source tree")
    raise SystemExit(1 if found else 0)
