"""Canary rollouts end to end: real uvicorn, real openai/httpx clients, real MLflow aliases, compressed time.

How many requests fall into a wall-clock window here is up to the machine: a window with too few is inconclusive
and held, so these tests assert the verdicts other than inconclusive. The exact verdicts of each window are
asserted in test_controller.py, where a manual clock decides when a window ends."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from kollm.errors import KollmError, NotFound
from kollm.rollout import client as rollout_client
from kollm.rollout.api import attach_rollout
from kollm.rollout.state import RolloutConflict
from kollm.serve.gateway import Arm, Gateway

from .conftest import Load, Server, free_port, serving_app, state_file, wait_for

PAUSE = 0.5


def make_gateway(registered, project, *, api_key=None, **canary_behaviour):
    name = registered.name
    stable = Arm(serving_app("1", name=name, api_key=api_key), version="1", model_name=name)
    canary = Arm(serving_app("2", name=name, api_key=api_key, **canary_behaviour), version="2", model_name=name)
    gw = Gateway(stable, canary)
    attach_rollout(gw, project_dir=project, model_name=name, api_key=api_key)
    return gw


def start(url, name, **kw):
    return rollout_client.start(name, **{"pause": f"{PAUSE}s", "min_requests": 3, **kw}, gateway=url)


def status(url):
    return rollout_client.command("status", gateway=url)


def test_healthy_canary_is_promoted_without_failed_requests(registered, tmp_path, webhook):
    gw = make_gateway(registered, tmp_path)
    with Server(gw) as srv, Load(srv.url, registered.name) as load:
        time.sleep(0.2)
        start(srv.url, registered.name, steps="25,50,75", alert_webhook=webhook.url)
        wait_for(lambda: status(srv.url)["rollout"]["status"] == "promoted", 15, "promotion")
        time.sleep(0.5)  # load keeps running across the swap
        st = status(srv.url)
        promoted_kept = gw.stable.take_window()[0]  # the promoted arm's requests since the swap
        metrics = httpx.get(f"{srv.url}/metrics").text
    n = registered.name
    assert f'kollm_rollout_analysis_total{{rollout="{n}",verdict="pass"}} 3.0' in metrics
    assert f'kollm_rollout_status{{rollout="{n}",status="promoted"}} 1.0' in metrics
    assert (
        f'kollm_rollout_canary_weight_percent{{rollout="{n}"}} 0.0' in metrics
    )  # no canary left: all on the new stable
    assert 'kollm_gateway_requests_total{arm="canary",outcome="success",version="2"}' in metrics
    assert (
        'kollm_requests_total{endpoint="/v1/chat/completions",model_version="2",status_code="200"}' in metrics
    )  # the app's own
    assert load.result.failed == [], load.result.failed[:5]
    assert load.result.ok > 50
    verdicts = [h["result"]["verdict"] for h in st["rollout"]["history"]]
    assert [v for v in verdicts if v != "inconclusive"] == ["pass", "pass", "pass"], (
        verdicts
    )  # (too little traffic: held)
    assert [h["weight"] for h in st["rollout"]["history"] if h["result"]["verdict"] == "pass"] == [25, 50, 75]
    assert st["gateway"]["stable_version"] == "2" and st["gateway"]["canary_version"] is None
    assert gw.stable.version == "2" and promoted_kept == []  # no analysis window left open: nothing piles up
    assert registered.alias("champion") == "2" and registered.alias("previous") == "1"
    assert registered.tags("2")["kollm.rollout.result"] == "promoted"
    saved = json.loads(state_file(tmp_path, registered.name).read_text())
    assert saved["status"] == "promoted" and saved["weight"] == 100
    wait_for(lambda: webhook.received, 5, "the promotion alert")
    assert "promoted" in webhook.received[0]["text"]


def test_failing_canary_is_rolled_back_under_load(registered, tmp_path, webhook):
    gw = make_gateway(registered, tmp_path, fail_ratio=0.3)
    with Server(gw) as srv, Load(srv.url, registered.name) as load:
        time.sleep(0.2)
        # 8 samples hold at least one of the canary's 3-in-10 failures; 50 % gives ~2x that at this load
        start(srv.url, registered.name, steps="50,75", pause="1s", min_requests=8, alert_webhook=webhook.url)
        wait_for(lambda: status(srv.url)["rollout"]["status"] == "rolled_back", 10, "rollback")
        rolled_back_at = time.monotonic()
        time.sleep(0.5)
    # requests sent once the rollback was visible (one sent just before may still finish on the canary)
    after = load.result.versions(sent_after=rolled_back_at)
    saved = json.loads(state_file(tmp_path, registered.name).read_text())
    assert saved["status"] == "rolled_back" and saved["weight"] == 0
    # rolled back after two failed analyses; a window that caught fewer than 8 canary requests (a loaded machine)
    # is inconclusive and held
    verdicts = [h["result"]["verdict"] for h in saved["history"]]
    assert [v for v in verdicts if v != "inconclusive"] == ["fail", "fail"], verdicts
    assert set(after) == {"1"}, after  # weight 0: only the stable version serves
    assert load.result.failed == [], load.result.failed[:5]  # every error came from the canary itself
    assert load.result.canary_errors > 0
    assert registered.alias("champion") == "1"
    assert "success_rate" in registered.tags("2")["kollm.rollout.failed_analysis"]
    wait_for(lambda: webhook.received, 5, "the rollback alert")
    assert "ROLLED BACK" in webhook.received[0]["text"] and registered.name in webhook.received[0]["text"]


def test_slow_canary_is_rolled_back_and_no_request_fails(registered, tmp_path, webhook):
    gw = make_gateway(registered, tmp_path, delay_s=0.3)
    with Server(gw) as srv, Load(srv.url, registered.name, threads=6) as load:
        time.sleep(0.2)
        start(srv.url, registered.name, analysis="success_rate>=0.95,p95_ms<=150", alert_webhook=webhook.url)
        wait_for(lambda: status(srv.url)["rollout"]["status"] == "rolled_back", 10, "rollback")
        time.sleep(0.5)  # slow canary requests in flight at the rollback finish
    saved = json.loads(state_file(tmp_path, registered.name).read_text())
    verdicts = [h["result"]["verdict"] for h in saved["history"]]
    assert [v for v in verdicts if v != "inconclusive"] == ["fail", "fail"], (
        verdicts
    )  # inconclusive: too few slow requests
    assert all(h["result"]["values"]["p95_ms"] > 150 for h in saved["history"] if h["result"]["verdict"] == "fail")
    assert "p95_ms" in saved["message"]
    assert load.result.failed == [] and load.result.canary_errors == 0, load.result.failed[:5]
    assert load.result.versions()["2"] > 0  # the canary did serve (slowly) before the rollback
    assert registered.alias("champion") == "1"
    wait_for(lambda: webhook.received, 5, "the rollback alert")
    assert "p95_ms" in webhook.received[0]["text"]


def test_gateway_restart_mid_rollout_resumes_at_the_same_step(registered, tmp_path):
    dead_webhook = f"http://127.0.0.1:{free_port()}/nobody-listens"
    with Server(make_gateway(registered, tmp_path)) as srv, Load(srv.url, registered.name):
        start(srv.url, registered.name, pause="1s", alert_webhook=dead_webhook)
        wait_for(lambda: status(srv.url)["rollout"]["step"] == 2, 10, "step 2")
    saved = json.loads(state_file(tmp_path, registered.name).read_text())
    assert (
        saved["status"] == "progressing" and saved["step"] == 2 and saved["step_index"] == 1 and saved["weight"] == 40
    )

    # a new process would build everything again from the project folder: new apps, new gateway
    with Server(make_gateway(registered, tmp_path)) as srv:
        st = status(srv.url)
        assert st["rollout"]["step"] == 2 and st["rollout"]["status"] == "progressing"
        assert st["gateway"]["canary_weight"] == 40
        assert "resumed" in st["rollout"]["message"]
        verdicts = [h["result"]["verdict"] for h in st["rollout"]["history"]]
        assert [v for v in verdicts if v != "inconclusive"] == ["pass"], verdicts  # (too little traffic: held)
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert f'kollm_rollout_step{{rollout="{registered.name}"}} 2.0' in metrics
        assert f'kollm_rollout_canary_weight_percent{{rollout="{registered.name}"}} 40.0' in metrics
        with Load(srv.url, registered.name):
            wait_for(lambda: status(srv.url)["rollout"]["step"] == 3, 10, "step 3 after the restart")
        rollout_client.command("promote", gateway=srv.url)
        assert status(srv.url)["rollout"]["status"] == "promoted"
        alerts = wait_for(lambda: status(srv.url)["rollout"]["alerts"], 10, "the alert attempt")
    assert registered.alias("champion") == "2" and registered.alias("previous") == "1"
    assert not alerts[0]["delivered"] and "Connect" in alerts[0]["error"]  # a dead webhook breaks nothing


def test_pause_resume_abort_and_api_key(registered, tmp_path, webhook):
    gw = make_gateway(registered, tmp_path, api_key="s3cret")
    with Server(gw) as srv:
        r = httpx.get(f"{srv.url}/admin/rollout/status")
        assert r.status_code == 401
        with pytest.raises(KollmError, match="API key") as e:
            rollout_client.command("status", gateway=srv.url)
        assert e.type is KollmError  # 401: not a settings, not-found or conflict error
        key = {"gateway": srv.url, "api_key": "s3cret"}
        with pytest.raises(NotFound, match="not 'other'"):
            rollout_client.start("other", **key)
        rollout_client.start(registered.name, pause="0.3s", alert_webhook=webhook.url, **key)
        with pytest.raises(RolloutConflict, match="progressing"):
            rollout_client.start(registered.name, **key)
        paused = rollout_client.command("pause", **key)["rollout"]
        assert paused["status"] == "paused" and paused["weight"] == 20
        time.sleep(0.8)  # no analysis while paused (no traffic would make it inconclusive)
        st = rollout_client.command("status", **key)["rollout"]
        assert st["history"] == [] and st["status"] == "paused"
        assert rollout_client.command("resume", **key)["rollout"]["status"] == "progressing"
        wait_for(lambda: rollout_client.command("status", **key)["rollout"]["history"], 5, "an inconclusive window")
        st = rollout_client.command("status", **key)["rollout"]
        assert st["history"][0]["result"]["verdict"] == "inconclusive" and st["step"] == 1 and st["failures"] == 0
        aborted = rollout_client.command("abort", reason="bad vibes", **key)
        assert aborted["rollout"]["status"] == "aborted" and aborted["gateway"]["canary_weight"] == 0
        with pytest.raises(RolloutConflict, match="aborted"):
            rollout_client.command("resume", **key)
    assert registered.alias("champion") == "1"
    assert registered.tags("2")["kollm.rollout.reason"] == "bad vibes"
    wait_for(lambda: webhook.received, 5, "the abort alert")
    assert "bad vibes" in webhook.received[0]["text"]


def run_cli(*args: str):
    from typer.testing import CliRunner

    from kollm.cli import app

    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def test_cli_and_quality_probe(registered, tmp_path, webhook):
    """`kollm rollout ...` against a running gateway; the probe alone judges the canary (no user traffic)."""
    good = tmp_path / "probe-good.jsonl"
    good.write_text('{"prompt": "안녕하세요", "expect": "답변"}\n{"prompt": "서울은?"}\n', encoding="utf-8")
    bad = tmp_path / "probe-bad.jsonl"
    bad.write_text('{"prompt": "대한민국의 수도는?", "expect": "서울"}\n', encoding="utf-8")
    with Server(make_gateway(registered, tmp_path, api_key="k")) as srv:
        gw = ["--gateway", srv.url, "--api-key", "k"]
        r = run_cli("rollout", "status", *gw)
        assert r.exit_code == 0 and "no rollout started" in r.output
        r = run_cli(
            "rollout",
            "start",
            registered.name,
            "--steps",
            "50,100",
            "--pause",
            "0.3s",
            "--analysis",
            "probe_pass_rate>=1",
            "--probe",
            str(bad),
            "--alert-webhook",
            webhook.url,
            *gw,
        )
        assert r.exit_code == 0, r.output
        wait_for(lambda: status_with_key(srv.url)["rollout"]["status"] == "rolled_back", 10, "rollback by the probe")
        r = run_cli("rollout", "status", *gw)
        assert "ROLLED_BACK" in r.output and "probe_pass_rate=0" in r.output
        hist = status_with_key(srv.url)["rollout"]["history"]
        assert [h["result"]["verdict"] for h in hist] == ["fail", "fail"] and "lacks '서울'" in hist[0]["note"]

        r = run_cli(
            "rollout",
            "start",
            registered.name,
            "--steps",
            "50,100",
            "--pause",
            "0.3s",
            "--analysis",
            "probe_pass_rate>=1",
            "--probe",
            str(good),
            *gw,
        )
        assert r.exit_code == 0, r.output
        wait_for(lambda: status_with_key(srv.url)["rollout"]["status"] == "promoted", 10, "promotion by the probe")
        r = run_cli("rollout", "status", "--json", *gw)
        assert json.loads(r.output)["gateway"]["stable_version"] == "2"
    assert registered.alias("champion") == "2"


def status_with_key(url):
    return rollout_client.command("status", gateway=url, api_key="k")
