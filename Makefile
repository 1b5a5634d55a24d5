# Quick start: `make demo` runs a real example end to end, `make test` runs the tests.
# Both bootstrap .venv (CPU torch 2.13.0, this package in editable mode, dev tools).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT ?= out

.PHONY: demo test lint bench clean

$(VENV)/.ready: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps --ignore-requires-python betty-ml==0.2.1
	touch $@

demo: $(VENV)/.ready
	$(BIN)/python examples/hpo_l2.py

test: $(VENV)/.ready
	$(BIN)/python -m pytest -q

lint: $(VENV)/.ready
	$(BIN)/ruff check mlocompile passes tests examples
	$(BIN)/ruff format --check mlocompile passes
	$(BIN)/mypy mlocompile passes

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .mypy_cache .ruff_cache
