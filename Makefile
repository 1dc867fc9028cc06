# kollm — `make demo` runs the Korean quickstart end to end on CPU; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.kollm-installed
DEMO_DIR ?= build/demo
PYTEST_ARGS ?=

.PHONY: install demo test test-fast check bench clean

# torch==2.13.0 first: any other torch spec pulls several GB of CUDA packages on this CPU-only setup.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev,ray]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	rm -rf $(DEMO_DIR)
	$(BIN)/kollm init $(DEMO_DIR) --example korean-quickstart
	cd $(DEMO_DIR) && $(abspath $(BIN))/kollm run
	cd $(DEMO_DIR) && $(abspath $(BIN))/kollm runs

# Lint (ruff: rules in pyproject) and types (mypy + pydantic plugin over the modules listed in pyproject's
# [tool.mypy] files); CI runs it before the tests.
check: install
	$(BIN)/ruff check src tests
	$(BIN)/mypy

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf build .pytest_cache
