# `make demo` sets up .venv and runs the main job on generated data; `make test` runs the test suite (what CI
# runs); `make test-fast` runs it without the tests marked `slow`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/retrieval: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0   # first and pinned: the CPU build; an unpinned torch pulls CUDA wheels
	$(BIN)/pip install -q -e ".[serve,test]"
	touch $@

.PHONY: setup demo test test-fast lint results
setup: $(BIN)/retrieval

demo: setup
	$(BIN)/retrieval demo --out demo

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check .

results: setup
	$(BIN)/retrieval results --out docs
