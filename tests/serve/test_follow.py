"""`kollm serve models:/NAME@champion` follows the alias: promote and rollback take effect within an interval,
under load, with no failed request, and every response names the version that answered. A real `kollm serve`
process, a registry on SQLite (the project's default), and a load of concurrent clients."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import httpx
import pytest

from kollm import registry
from kollm.serve.follow import parse_alias_uri

from .conftest import free_port, wait_ready

pytestmark = pytest.mark.slow(reason="a real `kollm serve` process under concurrent load while aliases move")


@pytest.fixture()
def project(tmp_path, tiny_model_dir):
    project = tmp_path / "proj"
    project.mkdir()
    (project / "kollm.yaml").write_text(
        "project: follow-test\nsteps:\n  - kind: python\n    config: {callable: 'm:f'}\n"
    )
    c = registry.client(project)
    exp_id = c.create_experiment("follow-test", artifact_location=(project / "mlartifacts").as_uri())
    for alias in ("champion", "challenger"):
        registry.register_folder(
            "ko-tiny",
            tiny_model_dir,
            run_id=c.create_run(exp_id).info.run_id,
            tags={},
            alias=alias,
            project_dir=project,
        )
    assert registry.tracking_uri(project).startswith("sqlite:")
    return project


class Load:
    """Clients sending requests back to back; each answer is recorded as (sent at, status, version)."""

    def __init__(self, url: str, clients: int = 3):
        self.url = url
        self.records: list[tuple[float, int, str]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.client, daemon=True) for _ in range(clients)]

    def client(self) -> None:
        body = {"model": "ko-tiny", "prompt": "안녕하세요", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        with httpx.Client(timeout=60) as c:
            while not self.stop.is_set():
                sent = time.time()
                try:
                    r = c.post(self.url + "/v1/completions", json=body)
                    self.records.append((sent, r.status_code, r.headers.get("x-kollm-model-version", "?")))
                except httpx.HTTPError as e:
                    self.records.append((sent, 0, type(e).__name__))

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)

    def wait_for_version(self, version: str, since: float, timeout: float = 180) -> float:
        deadline = time.time() + timeout
        while time.time() < deadline:
            hits = [sent for sent, status, v in list(self.records) if sent >= since and v == version]
            if hits:
                return hits[0]
            time.sleep(0.1)
        raise AssertionError(f"no response from version {version} within {timeout}s: {self.records[-5:]}")


def test_promote_and_rollback_swap_the_served_version_without_failing_a_request(project):
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kollm.cli",
            "serve",
            "models:/ko-tiny@champion",
            "--project",
            str(project),
            "--port",
            str(port),
            "--device",
            "cpu",
            "--follow-interval",
            "0.5",
        ],
        cwd=project,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout=300)  # minutes on a loaded 2-core CI machine
        with Load(url) as load:
            load.wait_for_version("1", 0)
            promoted_at = time.time()
            registry.promote("ko-tiny", "2", reason="test", project_dir=project)
            first_v2 = load.wait_for_version("2", promoted_at)
            rolled_back_at = time.time()
            registry.rollback("ko-tiny", reason="test", project_dir=project)
            first_v1 = load.wait_for_version("1", rolled_back_at)
            time.sleep(1.0)
        records = sorted(load.records)
        failed = [r for r in records if r[1] != 200]
        assert failed == [], failed[:5]
        # the version answering moves 1 -> 2 -> 1 and never back: once a request sent after a swap is answered by
        # the new version, every later-sent request is too
        assert all(v == "2" for sent, _, v in records if first_v2 <= sent < rolled_back_at)
        assert all(v == "1" for sent, _, v in records if sent >= first_v1 + 0.5)
        assert len(records) > 20
        assert httpx.get(url + "/ready").json()["version"] == "1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    output = proc.stdout.read()
    assert "Traceback" not in output, output
    assert "now serving version 2" in output and "now serving version 1" in output


def test_parse_alias_uri():
    assert parse_alias_uri("models:/ko-tiny@champion") == ("ko-tiny", "champion")
    assert parse_alias_uri("models:/ko-tiny/3") is None and parse_alias_uri("./model") is None
