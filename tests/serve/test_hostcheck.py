"""The Host allow-list against DNS rebinding (kollm.hostcheck): on the rollout gateway (its /admin/rollout/ too) and
on `kollm serve`, a request with a foreign Host gets 421 before any endpoint runs."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
from tests.rollout.conftest import Server, registered, tracking_uri  # noqa: F401  (fixtures)
from tests.rollout.test_rollout import make_gateway
from tests.serve.conftest import free_port, wait_ready

from kollm.hostcheck import HostCheck, allowed_hosts, host_name


def test_allowed_hosts_policy(monkeypatch):
    monkeypatch.delenv("KOLLM_ALLOWED_HOSTS", raising=False)
    assert host_name("[::1]:8000") == "::1" and host_name("Example.COM.:80") == "example.com"
    assert host_name("::1") == "::1" and host_name("127.0.0.1") == "127.0.0.1"
    assert allowed_hosts("127.0.0.1") == {"127.0.0.1", "localhost", "::1"}
    assert allowed_hosts("10.1.2.3", ["API.example"]) == {"10.1.2.3", "api.example", "127.0.0.1", "localhost", "::1"}
    # every interface: the names clients use are unknown, so only configured names are enforced
    assert allowed_hosts("0.0.0.0") is None and allowed_hosts("::") is None
    assert allowed_hosts("0.0.0.0", ["gw.internal"]) == {"gw.internal", "127.0.0.1", "localhost", "::1"}
    monkeypatch.setenv("KOLLM_ALLOWED_HOSTS", "a.example, b.example:8000")
    assert {"a.example", "b.example"} <= allowed_hosts("0.0.0.0")
    assert allowed_hosts("127.0.0.1", ["*"]) is None


def test_rebinding_attack_on_a_keyless_gateway_is_refused(registered, tmp_path, monkeypatch):  # noqa: F811
    """The attack of issue 32: a page on evil.example (resolving to 127.0.0.1) POSTs JSON to pause the rollout;
    its Origin matches its Host, so only the Host check stops it."""
    monkeypatch.delenv("KOLLM_ALLOWED_HOSTS", raising=False)
    gw = make_gateway(registered, tmp_path)
    reached = []

    async def spy(scope, receive, send):  # records what gets past the check
        reached.append(scope.get("path"))
        await gw(scope, receive, send)

    with Server(HostCheck(spy, allowed_hosts("127.0.0.1"))) as srv:
        port = srv.port
        evil = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
        for method, path in [("POST", "/admin/rollout/pause"), ("GET", "/admin/rollout/status"), ("GET", "/v1/models")]:
            r = httpx.request(method, srv.url + path, headers=evil, json={}, timeout=10)
            assert r.status_code == 421 and "DNS rebinding" in r.json()["error"]["message"], (path, r.text)
        assert [p for p in reached if p is not None] == []  # (lifespan scopes have no path)
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST"):
            assert httpx.get(srv.url + "/admin/rollout/status", headers={"Host": host}, timeout=10).status_code == 200
        assert "/admin/rollout/status" in reached


@pytest.mark.slow(reason="a `kollm serve` process: ~10 s alone, 80 s on a loaded machine")
def test_kollm_serve_answers_only_its_hosts(tiny_model_dir, tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kollm.cli", "serve", str(tiny_model_dir), "--port", str(port), "--device", "cpu"]
        + ["--allowed-host", "api.example"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        body = {"model": "model", "prompt": "안녕", "max_tokens": 1}
        r = httpx.post(url + "/v1/completions", json=body, headers={"Host": "evil.example"}, timeout=30)
        assert r.status_code == 421 and "--allowed-host" in r.json()["error"]["hint"], r.text
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "api.example", f"api.example:{port}"):
            assert httpx.get(url + "/v1/models", headers={"Host": host}, timeout=30).status_code == 200, host
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        if proc.stdout:
            proc.stdout.close()
