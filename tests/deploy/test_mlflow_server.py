"""The team setup the manifests describe, for real on loopback: an `mlflow server` on PostgreSQL (a fresh
database on 127.0.0.1:5432) whose artifacts go to an S3-compatible server (moto's, standing in for S3 or MinIO),
with kollm tracking a pipeline run and registering the model through it (`tracking.uri: http://127.0.0.1:PORT`)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.steps.evalproject import make_project

import kollm
from kollm import registry

BUCKET = "kollm-test"
pytestmark = [
    pytest.mark.postgres,
    pytest.mark.slow(reason="an `mlflow server` on PostgreSQL and an S3 server, and a pipeline through them"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout:.0f}s")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (mlflow server starts uvicorn workers), SIGKILL if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3-compatible server on a free loopback port, with the bucket created."""
    pytest.importorskip("moto", reason="moto[server] is not installed (pip install 'moto[server]')")
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    creds = {
        "aws_access_key_id": "kollm-test",
        "aws_secret_access_key": "kollm-test-secret",
        "region_name": "us-east-1",
    }
    s3 = boto3.client("s3", endpoint_url=endpoint, **creds)
    s3.create_bucket(Bucket=BUCKET)
    try:
        yield endpoint, s3, creds
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mlflow_server(module_postgres_uri, s3_server, tmp_path_factory):
    """`mlflow server` on a fresh PostgreSQL database, artifacts proxied to the S3 server; one for the module's
    tests (its start and PostgreSQL migrations take most of a minute)."""
    postgres_uri, tmp_path = module_postgres_uri, tmp_path_factory.mktemp("mlflow-server")
    endpoint, s3, creds = s3_server
    port = free_port()
    env = os.environ | {
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": creds["aws_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": creds["aws_secret_access_key"],
        "AWS_DEFAULT_REGION": "us-east-1",
        # webhooks to kollm watch's receiver on loopback over http (MLflow allows only public https by default)
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        "MLFLOW_WEBHOOK_CACHE_TTL": "1",
    }  # the server caches each event's webhook list (60 s by default)
    log = open(tmp_path / "mlflow-server.log", "w")
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            postgres_uri,
            "--artifacts-destination",
            f"s3://{BUCKET}/mlflow-artifacts",
            "--serve-artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, timeout=180)
        yield f"http://127.0.0.1:{port}", s3
    except (RuntimeError, TimeoutError) as e:
        log.flush()
        pytest.fail(f"mlflow server did not start: {e}\n{(tmp_path / 'mlflow-server.log').read_text()[-3000:]}")
    finally:
        stop(proc)
        log.close()


@pytest.mark.timeout(1200)  # a server start, a PostgreSQL migration and a pipeline: 5-7 min on this loaded 2-core box
def test_kollm_tracks_and_registers_through_an_mlflow_server_on_postgres_and_s3(mlflow_server, tmp_path, monkeypatch):
    uri, s3 = mlflow_server
    # the client holds no S3 credentials: artifacts travel through the server's proxy (--serve-artifacts)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    project = make_project(tmp_path / "p", gate=["perplexity <= 100000"], uri=uri)
    # artifacts through the server's proxy (kollm's default artifact location is a folder in the project)
    config = (project / "kollm.yaml").read_text(encoding="utf-8")
    config = config.replace(
        f"tracking: {{uri: '{uri}'}}", f"tracking: {{uri: '{uri}', artifact_location: 'mlflow-artifacts:/evaltest'}}"
    )
    assert "mlflow-artifacts:/evaltest" in config
    (project / "kollm.yaml").write_text(config, encoding="utf-8")
    result = kollm.run(project)

    assert registry.tracking_uri(project) == uri
    v = registry.show("evaltest", "challenger", project)
    assert v.version == "1" and v.aliases == ("challenger",)
    assert v.tags["kollm.pipeline_run_id"] == result.run_id
    assert v.tags["kollm.model_digest"] == result.steps["build"].outputs["model"].digest
    client = registry.client(project)
    parent = client.get_run(result.run_id)
    assert parent.info.status == "FINISHED"
    steps = {
        r.data.tags["mlflow.runName"]
        for r in client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result.run_id}'")
    }
    assert steps >= {"prep", "build", "evaluate", "register"}
    # the registered model's files are in the S3 bucket, and resolve back to the bytes the pipeline built
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
        for o in page.get("Contents", [])
    ]
    assert any(k.endswith("model.safetensors") for k in keys), keys[:20]
    folder = registry.resolve_model_uri("models:/evaltest@challenger", project)
    built = result.steps["build"].outputs["model"].path
    assert (folder / "model.safetensors").read_bytes() == (built / "model.safetensors").read_bytes()
    record = json.loads((result.steps["register"].outputs["registration"].path / "registration.json").read_text())
    assert record["version"] == "1"

    again = kollm.run(project)  # a cached rerun through the server registers nothing new
    assert all(r.cache_hit for r in again.steps.values())
    assert [x.version for x in registry.list_versions("evaltest", project)] == ["1"]


def test_the_servers_registry_webhook_reaches_kollm_watch_verified(mlflow_server, tmp_path):
    """`mlflow server` delivers a registry event, signed with the webhook's secret, to `kollm watch`'s receiver,
    which queues it as a trigger; a receiver with another secret refuses the same kind of delivery."""
    import threading

    from kollm.monitor.watch import StateStore, WatchSettings, webhook_server
    from kollm.pipeline.tracking import client_for

    uri, _ = mlflow_server
    client = client_for(uri)
    stores = {}
    for secret in ("s3cret", "other"):
        settings = WatchSettings(project_dir=tmp_path / secret, webhook_secret=secret, webhook_port=0)
        store = StateStore(settings.state_dir)
        server = webhook_server(settings, store, model_name="watched")
        threading.Thread(target=server.serve_forever, daemon=True).start()
        client.create_webhook(
            f"kollm-watch-{secret}",
            f"http://127.0.0.1:{server.server_address[1]}/",
            ["registered_model.created"],
            secret="s3cret",
        )
        stores[secret] = (store, server)
    try:
        client.create_registered_model("base-ko")
        deadline = time.monotonic() + 60
        while not (pending := stores["s3cret"][0].drain()):
            assert time.monotonic() < deadline, "no webhook delivery from the mlflow server within 60 s"
            time.sleep(0.2)
        assert [(t.kind, t.detail) for t in pending] == [
            ("webhook", "registry webhook registered_model.created base-ko")
        ]
        time.sleep(2)
        assert stores["other"][0].drain() == []  # signed with another secret: refused (401), nothing queued
    finally:
        for _, server in stores.values():
            server.shutdown()
