# Quick start: `make demo` runs a real example end to end, `make test` runs the tests
# (`make test-fast` all but the slow ones). `make bench` runs the side-by-side benchmark
# (see benchmarks/README.md). All bootstrap .venv (CPU torch 2.13.0, this package in
# editable mode, dev tools).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT ?= out

# torch is pinned to the CPU build by its local version label: pip accepts only a wheel
# built as 2.13.0+cpu, never a CUDA build (a plain torch==2.13.0 from PyPI is the CUDA one
# on Linux x86_64, several GB with its nvidia-* packages). pip on this project's machines
# is configured to find that wheel on local disk (for Python 3.11), so `make` needs nothing
# more here. Elsewhere, give pip PyTorch's CPU index:
#   make TORCH_INDEX=https://download.pytorch.org/whl/cpu test
# With torch installed first, the `torch>=2.9` of pyproject.toml installs nothing more.
TORCH ?= torch==2.13.0+cpu
TORCH_INDEX ?=

.PHONY: demo test test-fast lint bench clean

$(VENV)/.ready: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q '$(TORCH)' $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) || { \
	  echo "no wheel for $(TORCH) found; run: make TORCH_INDEX=https://download.pytorch.org/whl/cpu $(MAKECMDGOALS)" >&2; \
	  exit 1; }
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps --ignore-requires-python betty-ml==0.2.1
	$(BIN)/pip install -q --no-deps higher==0.2.1  # Betty's HigherIterativeProblem imports it (pure Python; --no-deps keeps our torch)
	touch $@

# The main job: Meta-Weight-Net on noisy long-tailed digits (3 seeds vs plain training), then one
# run through the command line that writes metrics, IR, generated code, cost and diagrams to out/demo.
demo: $(VENV)/.ready
	$(BIN)/python examples/data_reweighting.py
	$(BIN)/mlocompile run examples/data_reweighting.py --out $(OUT)/demo
	$(BIN)/mlocompile plot $(OUT)/demo -o $(OUT)/demo/curves.png

test: $(VENV)/.ready
	$(BIN)/python -m pytest -q -n 2  # two workers (pytest-xdist): ~15-17 min on 2 cores (1,345 tests, 2026-12-03)

# For daily work: everything but the tests marked slow (inductor compiles; see pyproject's markers).
test-fast: $(VENV)/.ready
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

bench: $(VENV)/.ready
	$(BIN)/python benchmarks/run.py

lint: $(VENV)/.ready
	$(BIN)/ruff check mlocompile passes tests examples benchmarks
	$(BIN)/ruff format --check mlocompile passes
	$(BIN)/mypy mlocompile passes

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .mypy_cache .ruff_cache
