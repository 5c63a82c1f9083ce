# `make demo` sets up .venv and runs the main job on generated data; `make test` runs the test suite (what CI
# runs); `make test-fast` runs it without the tests marked `slow`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# one pytest worker per core, a test file to a worker (its module fixtures built once); PARALLEL= runs serially
PARALLEL ?= -n auto --dist loadfile

$(BIN)/retrieval: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0   # first and pinned: the CPU build; an unpinned torch pulls CUDA wheels
	$(BIN)/pip install -q -e ".[serve,test,ray]"
	touch $@

.PHONY: setup browser demo test test-fast lint results
setup: $(BIN)/retrieval

demo: setup
	$(BIN)/retrieval demo --out demo

# The page test (tests/test_server_page.py) drives Debian's chromium through its driver: installed with apt where
# this user may; elsewhere that test is skipped, saying why.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null 2>&1 || \
			{ apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; }; \
		else echo "note: chromium and chromedriver are missing and apt-get is not this user's: the page test will be skipped"; fi; \
	fi

test: setup browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PARALLEL)

test-fast: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PARALLEL) -m "not slow"

lint: setup
	$(BIN)/ruff check .

results: setup
	$(BIN)/retrieval results --out docs
