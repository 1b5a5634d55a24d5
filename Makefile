# Quick start: `make demo` runs a real example end to end, `make test` runs the tests.
# `make bench` runs the side-by-side benchmark (see benchmarks/README.md).
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

# The main job: Meta-Weight-Net on noisy long-tailed digits (3 seeds vs plain training), then one
# run through the command line that writes metrics, IR, generated code, cost and diagrams to out/demo.
demo: $(VENV)/.ready
	$(BIN)/python examples/data_reweighting.py
	$(BIN)/mlocompile run examples/data_reweighting.py --out $(OUT)/demo
	$(BIN)/mlocompile plot $(OUT)/demo -o $(OUT)/demo/curves.png

test: $(VENV)/.ready
	$(BIN)/python -m pytest -q -n 2  # two workers (pytest-xdist): ~10 min on 2 cores, ~17 serially

bench: $(VENV)/.ready
	$(BIN)/python benchmarks/run.py

lint: $(VENV)/.ready
	$(BIN)/ruff check mlocompile passes tests examples benchmarks
	$(BIN)/ruff format --check mlocompile passes
	$(BIN)/mypy mlocompile passes

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .mypy_cache .ruff_cache
