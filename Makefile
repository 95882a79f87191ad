# The two commands README.md names: `make run` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.expertmesh-installed

.PHONY: setup run test test-rust test-python stubtest clean

setup: $(STAMP)

# Reinstall when the build inputs change; pip's cache makes a repeat cheap.
$(STAMP): pyproject.toml Cargo.toml kernels/pyproject.toml $(wildcard rust/src/*.rs rust/src/*/*.rs)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e kernels
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: setup
	$(VENV)/bin/expertmesh serve

test: setup test-rust test-python stubtest

test-rust:
	cargo test --quiet

test-python: setup
	$(PY) -m pytest -q

stubtest: setup
	$(PY) -m mypy.stubtest expertmesh._core

clean:
	rm -rf $(VENV) target
