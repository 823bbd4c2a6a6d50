# xct — the two README commands are `make demo` and `make test`; both install first.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
REQS := requirements/base.txt requirements/build.txt requirements/test.txt requirements/lock.txt pyproject.toml
# Off this workplace a plain `pip install torch` may pull a multi-GB CUDA build; set
# TORCH_PIP_ARGS="--index-url <PyTorch's CPU wheel index>" to force the CPU build.
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=

export MLFLOW_DISABLE_TELEMETRY=true
export GX_ANALYTICS_ENABLED=false
export RAY_AUTH_MODE=token
export DO_NOT_TRACK=1

.PHONY: install test test-fast lint demo clean-venv bench images

install: $(STAMP)

$(STAMP): $(REQS)
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0 $(TORCH_PIP_ARGS)
	$(PIP) install -q -r requirements/base.txt -r requirements/build.txt -r requirements/test.txt -c requirements/lock.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)
	@echo "installed into $(VENV)"

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# The inner loop: the suite minus the tests marked slow or integration (tests/conftest.py
# lists the modules that start real engines; docs/testing.md). CI runs the full `make test`.
test-fast: install
	$(PY) -m pytest -m "not slow and not integration" $(PYTEST_ARGS)

# ruff, pinned in requirements/test.txt; the rule set is in pyproject.toml ([tool.ruff]).
lint: install
	$(VENV)/bin/ruff check .

demo: install
	$(PY) -m pipelines.demo

# Every image of infra/images.yaml into podman's local store, offline (root, Debian's podman,
# runc and debootstrap; see infra/images.py). tests/test_images.py runs what it built.
images: install
	$(PY) infra/images.py build --local

bench: install
	$(PY) benchmarks/bench_drr.py

clean-venv:
	rm -rf $(VENV)
