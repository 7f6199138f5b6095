# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint format docs bench bench-quick clean venv

$(BIN)/python:
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "jobrunner needs Python >= 3.11; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# uv installs in seconds; plain pip is the fallback if uv cannot be had.
$(STAMP): pyproject.toml | $(BIN)/python
	($(BIN)/python -m pip install --quiet uv && $(BIN)/uv pip install --quiet --python $(BIN)/python -e '.[dev]') \
	  || $(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/jobrunner demo

test: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check jobrunner tests examples benchmarks
	$(BIN)/ruff format --check jobrunner
	$(BIN)/mypy jobrunner

format: $(STAMP)
	$(BIN)/ruff format jobrunner tests examples benchmarks
	$(BIN)/ruff check --fix jobrunner tests examples benchmarks

docs: $(STAMP)
	$(BIN)/mkdocs build --strict

bench: $(STAMP)
	$(BIN)/python -m benchmarks all

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks all --quick

clean:
	rm -rf $(VENV) site .pytest_cache .mypy_cache .ruff_cache jobrunner.db jobrunner.db-*
