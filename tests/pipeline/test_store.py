"""The artifact store on an fsspec URL: a pipeline whose finished steps live in S3 (moto's S3 server on loopback;
production uses real S3 or MinIO) or in fsspec's in-memory file system, with the same digests as the local store."""

from __future__ import annotations

import socket

import pytest

import kollm
from kollm.errors import KollmError
from kollm.pipeline.store import FsspecStore, open_store

from .helpers import calls, make_project


def _run_against(store_url: str, tmp_path):
    local = kollm.run(make_project(tmp_path / "local", module="steps_store"))
    root = make_project(tmp_path / "remote", module="steps_store")
    first = kollm.run(root, store=store_url)
    assert {n: r.outputs[o].digest for n, r in first.steps.items() for o in r.outputs} == {
        n: r.outputs[o].digest for n, r in local.steps.items() for o in r.outputs
    }
    assert not (root / ".kollm" / "steps").exists()  # published to the store, read back through its cache
    again = kollm.run(root, store=store_url)
    assert all(r.cache_hit for r in again.steps.values()) and sorted(calls(root)) == [
        "count:count",
        "count:count2",
        "make_corpus",
    ]
    store = open_store(store_url, root / ".kollm")
    assert isinstance(store, FsspecStore)
    manifest = store.lookup(first.steps["count"].key)
    assert manifest["outputs"]["m"]["uri"].startswith(store_url.split("://")[0] + "://")
    art = store.materialize(manifest["outputs"]["m"]["uri"])
    assert art.digest == first.steps["count"].outputs["m"].digest and (art.path / "metrics.json").exists()
    return store


def test_memory_store(tmp_path):
    _run_against("memory://kollm-store-test", tmp_path)


def test_s3_store_on_moto_server(tmp_path, monkeypatch):
    pytest.importorskip("s3fs", reason="s3fs is not installed: pip install 'kollm[s3]'")
    server_mod = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        for k, v in {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        }.items():
            monkeypatch.setenv(k, v)
        import s3fs

        s3fs.S3FileSystem(endpoint_url=f"http://127.0.0.1:{port}").mkdir("kollm")  # the bucket
        store = _run_against("s3://kollm/pipelines", tmp_path)
        # a tampered object is caught by its digest, never silently used
        manifest = store.lookup(
            next(iter(sorted(store.fs.ls("kollm/pipelines/steps")))).rsplit("/", 1)[1].removesuffix(".json")
        )
        uri = manifest["outputs"][next(iter(manifest["outputs"]))]["uri"]
        victim = next(p for p in store.fs.find(uri) if not p.endswith("kollm-artifact.json"))
        store.fs.pipe(victim, b"tampered")
        fresh = FsspecStore("s3://kollm/pipelines", cache_dir=tmp_path / "fresh-cache")
        with pytest.raises(KollmError, match="do not match the artifact's digest"):
            fresh.materialize(uri)
    finally:
        server.stop()


def test_s3_store_without_credentials_is_one_message(tmp_path):
    """Found: `--store s3://...` without credentials printed an 80-line botocore traceback."""
    import os
    import subprocess
    import sys

    pytest.importorskip("s3fs", reason="s3fs is not installed: pip install 'kollm[s3]'")
    root = make_project(tmp_path / "p")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_EC2_METADATA_DISABLED="true",  # no instance role lookup
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL="http://127.0.0.1:9",  # never reached: signing fails first
    )
    r = subprocess.run(
        [sys.executable, "-m", "kollm.cli", "run", str(root), "--store", "s3://kollm-no-credentials/p", "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "s3://kollm-no-credentials/p" in r.stderr and "NoCredentialsError" in r.stderr
    assert "AWS_ACCESS_KEY_ID" in r.stderr and len(r.stderr.strip().splitlines()) <= 4, r.stderr
