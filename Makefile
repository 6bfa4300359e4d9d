# Two commands do everything on a fresh machine:
#   make demo   - create the virtualenv, install, run the embedded end-to-end demo
#   make test   - create the virtualenv, install with test extras, run the whole suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# `make demo` installs the package alone (no torch: the demo never imports it); `make test`
# adds the test extras. Each stamp is redone when setup.py or this file changes.
DEMO_STAMP := $(VENV)/.twins_tf-installed
TEST_STAMP := $(VENV)/.twins_tf-test-installed
TEST_FLAGS ?=
# pytest-xdist workers of `make test` (tests are handed out one at a time, idle workers steal).
TEST_WORKERS ?= 2
# timm, the reference for the ConvNeXt/ViT backbones, in its own virtualenv (tests/timm_requirements.txt
# says why): `make test` creates it, the parity tests run it as a subprocess.
TIMM_VENV ?= .venv-timm
TIMM_STAMP := $(TIMM_VENV)/.installed
# This machine keeps the CPU build of torch 2.13.0 as a local wheel (PyPI's newest is CUDA).
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)

.PHONY: demo test bench venv clean bazel-test

venv: $(TEST_STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(DEMO_STAMP): setup.py Makefile | $(VENV)/bin/python
	$(PIP) install -e .
	touch $(DEMO_STAMP)

$(TEST_STAMP): setup.py Makefile | $(VENV)/bin/python
	$(PIP) install $(FIND_LINKS) -e '.[test]'
	touch $(DEMO_STAMP) $(TEST_STAMP)

$(TIMM_STAMP): tests/timm_requirements.txt
	$(PYTHON) -m venv $(TIMM_VENV)
	$(TIMM_VENV)/bin/pip install -r tests/timm_requirements.txt
	touch $(TIMM_STAMP)

demo: $(DEMO_STAMP)
	$(PY) -m twins_tf.demo --output_dir=demo_out

test: $(TEST_STAMP) $(TIMM_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	TWINS_TF_TIMM_PYTHON=$(abspath $(TIMM_VENV))/bin/python $(PY) -m pytest tests -n $(TEST_WORKERS) --dist worksteal $(TEST_FLAGS)

bench: $(TEST_STAMP)
	$(PY) benchmarks/train_step.py

# Bazel (Debian's bazel-bootstrap 4.2.3, offline): one target per module, test file and binary.
# tools/bazel_test.sh apt-installs bazel-bootstrap only when no `bazel` is on PATH.
BAZEL_FLAGS ?=
bazel-test: $(TEST_STAMP) $(TIMM_STAMP)
	tools/bazel_test.sh $(BAZEL_FLAGS)

clean:
	rm -rf $(VENV) $(TIMM_VENV) demo_out .pytest_cache
