"""Runs pytest on the test files named on the command line, for Bazel's py_test targets.

Bazel starts a py_test as a script; this runner hands its arguments to pytest, writes the
JUnit XML that Bazel collects (XML_OUTPUT_FILE), and counts a file whose tests were all
deselected by pytest.ini's `-m "not slow"` as a pass, the way `make test` does.

The virtualenv installs twins_tf in editable mode, whose import hook finds any twins_tf module
in the source tree. Under Bazel that hook would hide a dependency missing from BUILD, so it is
removed before pytest starts: a module that is not in the test's runfiles fails to import.
"""

import os
import sys

import pytest

_EDITABLE_FINDER_PREFIX = "__editable__"


def drop_editable_finders():
    """Removes setuptools' editable-install import hooks from `sys.meta_path`."""
    sys.meta_path[:] = [
        finder
        for finder in sys.meta_path
        if not getattr(finder, "__module__", "").startswith(_EDITABLE_FINDER_PREFIX)
    ]


class _SelectionCounter:
    """pytest plugin that counts the collected tests and the ones deselected by markers."""

    def __init__(self):
        self.selected = 0
        self.deselected = 0

    def pytest_deselected(self, items):
        self.deselected += len(items)

    def pytest_collection_finish(self, session):
        self.selected = len(session.items)


def main(argv):
    """Runs pytest with `argv[1:]` and returns the process exit code."""
    if len(argv) < 2:
        print(
            "usage: pytest_main.py TEST_FILE [PYTEST_ARGS...]: name the test file to run",
            file=sys.stderr,
        )
        return 2
    drop_editable_finders()
    args = list(argv[1:])
    xml_output = os.environ.get("XML_OUTPUT_FILE")
    if xml_output:
        args.append(f"--junitxml={xml_output}")
    counter = _SelectionCounter()
    exit_code = pytest.main(args, plugins=[counter])
    if exit_code == pytest.ExitCode.NO_TESTS_COLLECTED and counter.deselected:
        print(f"all {counter.deselected} tests deselected by markers (see pytest.ini): pass")
        return 0
    return int(exit_code)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
