# The two commands in the README: `make demo` and `make test`. Both create a virtual
# environment in .venv (unless one is active), install torch 2.13.0 first when torch
# is missing (so pip does not pull a CUDA build), then this package with its extras.

SHELL := /bin/bash
VENV ?= .venv
BOOTSTRAP_PYTHON ?= python3
ifeq ($(VIRTUAL_ENV),)
PY := $(VENV)/bin/python
STAMP := $(VENV)/.megagpt-installed
else
PY := python
STAMP := $(VIRTUAL_ENV)/.megagpt-installed
endif

.PHONY: install demo test lint format clean

$(STAMP): setup.cfg pyproject.toml
	@if [ -z "$$VIRTUAL_ENV" ] && [ ! -x "$(VENV)/bin/python" ]; then \
		echo "creating virtual environment $(VENV)"; $(BOOTSTRAP_PYTHON) -m venv $(VENV); fi
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[dev]"
	@touch $@

install: $(STAMP)

demo: install
	$(PY) -m megagpt demo $(ARGS)

test: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	@# DeepSpeed's CPU Adam (and async_io where libaio-dev is installed), built once per
	@# environment so that the DeepSpeed tests run them (a few minutes the first time)
	$(PY) -m megagpt setup deepspeed
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf runs build *.egg-info .pytest_cache .ruff_cache
