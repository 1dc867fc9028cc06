from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# The time budget: @pytest.mark.slow needs a reason; a test over 120 s fails unless marked slow (tests/slow_guard.py);
# under pytest-xdist, the tests that share the session's Ray instance or quickstart run share a worker (xdist_groups)
pytest_plugins = ["tests.slow_guard", "tests.xdist_groups"]

# Nothing in the suite may reach a model or data hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)

KOLLM = str(Path(sys.executable).parent / "kollm")

# What pointing MLflow at a project writes into os.environ (kollm.pipeline.tracking._point_mlflow_at)
TRACKING_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "KOLLM_SET_TRACKING_URI")


@pytest.fixture(autouse=True)
def isolated_tracking():
    """Running a project points MLflow at its store through os.environ; keep one test's store out of the next (and
    out of processes started later, such as the session's Ray instance): cleared before and after every test."""
    for k in TRACKING_VARS:
        os.environ.pop(k, None)
    yield
    import mlflow

    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    for k in TRACKING_VARS:
        os.environ.pop(k, None)


@pytest.fixture
def kollm_bin() -> str:
    """The installed `kollm` entry point of this interpreter's environment."""
    return KOLLM


@pytest.fixture
def postgres_uri():
    """A fresh PostgreSQL database on 127.0.0.1:5432 for one test, dropped afterwards."""
    yield from _postgres_database()


@pytest.fixture(scope="module")
def module_postgres_uri():
    """A fresh PostgreSQL database shared by the tests of one module (e.g. behind one `mlflow server`)."""
    yield from _postgres_database()


def _postgres_database():
    import uuid

    psycopg2 = pytest.importorskip("psycopg2")
    name = f"kollm_test_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="test", connect_timeout=5)
    except psycopg2.OperationalError as e:
        pytest.fail(f"PostgreSQL on 127.0.0.1:5432 is not reachable: {e}")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance (2 CPUs, no dashboard) shared by every test of the session that asks for it;
    started on first use (it takes several seconds) and shut down at the end. Its workers import this checkout's
    `kollm` and `tests` packages (PYTHONPATH), so a test may hand them its own module-level functions."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'kollm[ray]'")
    root = Path(__file__).resolve().parent.parent
    paths = [str(root / "src"), str(root), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {
        "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)),  # the raylet and its workers inherit it
        # Ray Train gives a worker group 60 s to start; on a loaded 2-core CI machine importing torch can take longer
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600",
    }
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    for k in TRACKING_VARS:  # the raylet and every worker would inherit a project's store from this process
        os.environ.pop(k, None)
    try:
        yield ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 2**20)
    finally:
        ray.shutdown()
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """The Korean quickstart run once with `kollm run` (minutes on CPU), shared by the tests that need a whole
    real pipeline: (project folder, RunResult). A test may change the project afterwards (promote, rerun); the
    RunResult keeps describing that first run."""
    import kollm
    from kollm.examples import init_project

    project = init_project(tmp_path_factory.mktemp("quickstart") / "qs", "korean-quickstart")
    result = kollm.run(project)
    for k in TRACKING_VARS:  # set up outside any one test: leave no store behind for the tests that follow
        os.environ.pop(k, None)
    return project, result
