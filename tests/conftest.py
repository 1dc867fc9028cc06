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
