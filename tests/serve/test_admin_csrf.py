"""The rollout admin endpoints on a real gateway refuse what a web page could send cross-site (no API key set)."""

from __future__ import annotations

import httpx
import pytest

from kollm.rollout import client as rollout_client
from kollm.rollout.api import attach_rollout
from kollm.rollout.state import RolloutConflict
from kollm.serve import create_app
from kollm.serve.gateway import Arm, Gateway

from .conftest import start_server
from .fake_engine import FakeEngine


@pytest.fixture()
def gateway_url(tmp_path):
    arms = [
        Arm(create_app(FakeEngine("x"), model_name="m", model_version=v), version=v, model_name="m") for v in ("1", "2")
    ]
    gw = Gateway(*arms)
    attach_rollout(gw, project_dir=tmp_path, model_name="m")
    live = start_server(gw)
    yield live.url
    live.stop()


@pytest.mark.parametrize(
    "headers,content,status",
    [
        ({"content-type": "text/plain", "origin": "http://evil.example"}, b"{}", 403),  # a cross-site "simple" POST
        ({"content-type": "text/plain"}, b"{}", 415),
        ({"content-type": "application/x-www-form-urlencoded"}, b"a=1", 415),
        ({"content-type": "multipart/form-data; boundary=x"}, b"--x--", 415),
        ({}, b"", 415),  # fetch(url, {method: "POST", mode: "no-cors"}) sends no content type
        ({"content-type": "application/json", "origin": "http://evil.example"}, b"{}", 403),
        ({"content-type": "application/json", "origin": "null"}, b"{}", 403),
        ({"content-type": "application/json", "sec-fetch-site": "cross-site"}, b"{}", 403),
    ],
)
def test_cross_site_and_non_json_posts_are_refused(gateway_url, headers, content, status):
    for command in ("pause", "resume", "abort", "promote", "start"):
        r = httpx.post(f"{gateway_url}/admin/rollout/{command}", content=content, headers=headers)
        assert r.status_code == status, (command, r.text)
        assert r.json()["error"]["hint"]


def test_json_posts_from_the_gateway_itself_and_the_cli_pass(gateway_url):
    host = gateway_url.removeprefix("http://")
    r = httpx.post(f"{gateway_url}/admin/rollout/pause", json={}, headers={"origin": f"http://{host}"})
    assert r.status_code == 409 and "no rollout has been started" in r.json()["error"]["message"]  # past the guard
    with pytest.raises(RolloutConflict):
        rollout_client.command("pause", gateway=gateway_url)
    assert httpx.get(f"{gateway_url}/admin/rollout/status").status_code == 200
