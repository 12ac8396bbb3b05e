# Two commands for a fresh clone: `make demo` and `make test`. Both create .venv if it is missing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel of torch for this project's machines; override for a GPU build: make demo TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed
# Fashion-MNIST comes from Debian's dataset-fashion-mnist; without root or apt the rest still works and
# `--preset fashion` says how to get it.
FASHION_DIR := /usr/share/datasets/fashion-mnist

# Two test processes: the suite is mostly single-threaded (one torch thread per test) and these machines have 2 cores.
PYTEST_ARGS ?= -n 2

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	@test -d $(FASHION_DIR) || { command -v apt-get >/dev/null && apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; } \
	  || echo "note: Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist); only --preset fashion needs it"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/disback demo --resume $(ARGS)

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# ruff (lint and format) and import-linter (the layers in pyproject.toml: dependencies point one way)
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) runs .pytest_cache
