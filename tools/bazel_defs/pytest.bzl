"""pytest_test: one Bazel py_test per pytest module in tests/.

Bazel runs a py_test as a plain script, while the suite is written for pytest (fixtures,
tests/conftest.py, the markers and options in pytest.ini). Every test therefore runs the same
small runner, pytest_main.py, on its own file; this macro writes that boilerplate once so a
BUILD entry only says which test file and which twins_tf modules it needs.
"""

_RUNNER = "//tools/bazel_defs:pytest_main.py"

def pytest_test(name, deps = [], data = [], size = "large", **kwargs):
    """A py_test that runs tests/<name>.py with pytest.

    Args:
      name: the test module's file name without `.py`; the file is tests/<name>.py.
      deps: py_library targets the test imports (tests.conftest is always added).
      data: extra runfiles; pytest.ini is always added so markers and options match `make test`.
      size: Bazel test size; "large" (15 min timeout) because TensorFlow tests import slowly.
      **kwargs: passed to py_test (tags, timeout, shard_count, ...).
    """
    test_file = "tests/%s.py" % name
    native.py_test(
        name = name,
        srcs = [test_file, _RUNNER],
        main = _RUNNER,
        args = [test_file],
        data = ["//:pytest.ini"] + data,
        deps = ["//:tests.conftest"] + deps,
        python_version = "PY3",
        srcs_version = "PY3",
        size = size,
        **kwargs
    )
