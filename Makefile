# Two entry points a new user needs (see README): `make repro` and `make test`.
# Both create .venv from the pinned requirements.lock on first use.
VENV ?= .venv
PYTHON ?= python3
BIN = $(VENV)/bin

.PHONY: install repro test test-all lint bench clean-venv

$(BIN)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $@

install: $(BIN)/.installed

repro: install  ## the whole pipeline on the embedded default data
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: install  ## fast suite (CI); slow end-to-end tests: make test-all
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest

test-all: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m ""

lint: install
	$(BIN)/ruff check src tests benchmarks && $(BIN)/ruff format --check src tests benchmarks

bench: install
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done
