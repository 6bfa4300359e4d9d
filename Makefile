# Two commands do everything on a fresh machine:
#   make demo   - create the virtualenv, install, run the embedded end-to-end demo
#   make test   - create the virtualenv, install with test extras, run the whole suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.twins_tf-installed
TEST_FLAGS ?=
# This machine keeps the CPU build of torch 2.13.0 as a local wheel (PyPI's newest is CUDA).
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)

.PHONY: demo test bench venv clean bazel-test

venv: $(STAMP)

$(STAMP): setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install $(FIND_LINKS) -e '.[test]'
	# torchattacks (test oracle for AutoAttack) pins requests~=2.25 and would downgrade it:
	# install it alone; its real needs (torch, numpy, scipy, tqdm) are already there.
	$(PIP) install --no-deps torchattacks==3.5.1
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m twins_tf.demo --output_dir=demo_out

test: $(STAMP)
	$(PY) -m pytest tests $(TEST_FLAGS)

bench: $(STAMP)
	$(PY) benchmarks/train_step.py

# Bazel (Debian's bazel-bootstrap 4.2.3, offline): one target per module, test file and binary.
# tools/bazel_test.sh apt-installs bazel-bootstrap only when no `bazel` is on PATH.
BAZEL_FLAGS ?=
bazel-test: $(STAMP)
	tools/bazel_test.sh $(BAZEL_FLAGS)

clean:
	rm -rf $(VENV) demo_out .pytest_cache
