from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Nothing in the suite may reach a model or data hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)

KOLLM = str(Path(sys.executable).parent / "kollm")


@pytest.fixture(autouse=True)
def isolated_tracking(monkeypatch):
    """mlflow.set_tracking_uri() also sets $MLFLOW_TRACKING_URI; keep one test's store out of the next."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    import mlflow

    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


@pytest.fixture
def kollm_bin() -> str:
    """The installed `kollm` entry point of this interpreter's environment."""
    return KOLLM


@pytest.fixture
def postgres_uri():
    """A fresh PostgreSQL database on 127.0.0.1:5432 for one test, dropped afterwards."""
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
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))  # the raylet and its workers inherit it
    try:
        context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 2**20)
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before
    try:
        yield context
    finally:
        ray.shutdown()
