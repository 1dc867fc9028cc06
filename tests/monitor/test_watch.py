"""`kollm watch`: triggers (cron, data digest, webhook), one retrain at a time, coalescing, crash resume,
outcomes to the alert webhook and MLflow; a real pipeline (a prepare step) runs through kollm.run."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone

import httpx
import pytest

from kollm.errors import ConfigError
from kollm.monitor.watch import (
    Running,
    StateStore,
    Trigger,
    WatchSettings,
    cron_due,
    parse_cron,
    run_cycle,
    verify_mlflow_signature,
    watcher_lock,
    webhook_server,
)
from tests.rollout.conftest import WebhookReceiver, registered, tracking_uri  # noqa: F401  (fixtures)

KOREAN = [
    "오늘 서울의 날씨는 맑고 기온은 {n}도까지 오르겠습니다. 외출할 때 모자를 챙기세요.",
    "한국어 언어 모델을 학습하려면 깨끗한 말뭉치가 필요합니다. 이번 자료는 {n}번째 문서입니다.",
    "회의는 오후 {n}시에 본관 대회의실에서 열립니다. 모든 팀원은 자료를 미리 읽어 오세요.",
]


def _ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


def test_cron_due():
    assert cron_due("0 3 * * *", _ts("2026-03-01T02:59:30"), _ts("2026-03-01T03:00:10"))
    assert not cron_due("0 3 * * *", _ts("2026-03-01T03:00:10"), _ts("2026-03-01T04:30:00"))
    assert cron_due(
        "0 3 * * *", _ts("2026-03-01T03:00:10"), _ts("2026-03-05T01:00:00")
    )  # missed days coalesce: one trigger
    assert cron_due("*/15 * * * *", _ts("2026-03-01T10:14:00"), _ts("2026-03-01T10:15:00"))
    assert not cron_due("*/15 * * * *", _ts("2026-03-01T10:15:00"), _ts("2026-03-01T10:29:59"))
    # 2026-03-02 is a Monday: "day 1 or Monday" fires on Monday the 2nd, "every Monday" not on Sunday the 1st
    assert cron_due("0 0 1 * 1", _ts("2026-03-01T23:00:00"), _ts("2026-03-02T00:00:00"))
    assert not cron_due("0 0 * * 1", _ts("2026-02-28T23:00:00"), _ts("2026-03-01T00:00:00"))


@pytest.mark.parametrize("expr", ["0 3 * *", "61 * * * *", "a * * * *", "*/0 * * * *"])
def test_bad_schedule_is_named(expr):
    with pytest.raises(ConfigError, match="--schedule"):
        parse_cron(expr)


def _signed(secret: str, body: bytes, *, stamp: int | None = None) -> dict[str, str]:
    from mlflow.webhooks.delivery import _generate_hmac_signature  # MLflow's own signing code

    delivery, stamp_s = str(uuid.uuid4()), str(stamp or int(time.time()))
    return {
        "X-MLflow-Delivery-Id": delivery,
        "X-MLflow-Timestamp": stamp_s,
        "Content-Type": "application/json",
        "X-MLflow-Signature": _generate_hmac_signature(secret, delivery, stamp_s, body.decode()),
    }


def test_mlflow_signature_verification():
    body = json.dumps(
        {"entity": "model_version", "action": "created", "data": {"name": "base", "version": "3"}}
    ).encode()
    headers = _signed("s3cret", body)
    assert verify_mlflow_signature("s3cret", headers, body)
    assert not verify_mlflow_signature("other", headers, body)
    assert not verify_mlflow_signature("s3cret", headers, body.replace(b"3", b"4"))
    assert not verify_mlflow_signature("s3cret", _signed("s3cret", body, stamp=int(time.time()) - 3600), body)  # stale
    assert not verify_mlflow_signature("s3cret", {}, body)


def test_webhook_receiver_queues_verified_events(tmp_path):
    store = StateStore(tmp_path / "watch")
    settings = WatchSettings(project_dir=tmp_path, webhook_secret="s3cret", webhook_port=0)
    server = webhook_server(settings, store, model_name="kodemo")
    import threading

    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        body = json.dumps(
            {"entity": "model_version", "action": "created", "data": {"name": "base-ko", "version": "3"}}
        ).encode()
        headers = _signed("s3cret", body)
        assert httpx.post(url, content=body, headers=headers).status_code == 202
        assert httpx.post(url, content=body, headers=headers).status_code == 200  # the same delivery again: ignored
        assert httpx.post(url, content=body, headers={**headers, "X-MLflow-Signature": "v1,AAAA"}).status_code == 401
        assert httpx.post(url, content=body).status_code == 401
        own = json.dumps(
            {"entity": "model_version", "action": "created", "data": {"name": "kodemo", "version": "9"}}
        ).encode()
        r = httpx.post(url, content=own, headers=_signed("s3cret", own))
        assert r.status_code == 200 and "ignored" in r.json()["status"]
    finally:
        server.shutdown()
        server.server_close()
    triggers = store.drain()
    assert [(t.kind, t.detail) for t in triggers] == [("webhook", "registry webhook model_version.created base-ko 3")]
    assert store.drain() == []


def _receiver(tmp_path):
    import threading

    settings = WatchSettings(project_dir=tmp_path, webhook_secret="s3cret", webhook_port=0)
    server = webhook_server(settings, StateStore(tmp_path / "watch"), model_name="kodemo")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _raw(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send `data` on a fresh connection; what the server answers until it closes (or `timeout` passes)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
        return got


def test_webhook_receiver_refuses_big_or_bad_lengths_before_reading(tmp_path):
    server = _receiver(tmp_path)
    port = server.server_address[1]
    try:
        # 600 MB announced, nothing sent: refused at once (the body was read into memory before)
        head = b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        assert _raw(port, head + b"Content-Length: 600000000\r\n\r\n").startswith(b"HTTP/1.0 413")
        assert _raw(port, head + b"Content-Length: -5\r\n\r\n").startswith(b"HTTP/1.0 400")
        assert _raw(port, head + b"Content-Length: 12abc\r\n\r\n").startswith(b"HTTP/1.0 400")
    finally:
        server.shutdown()
        server.server_close()


def test_webhook_receiver_drops_a_stalled_client(tmp_path, monkeypatch):
    import socket

    from kollm.monitor import watch as watch_mod

    monkeypatch.setattr(watch_mod, "WEBHOOK_READ_TIMEOUT_S", 0.5)
    server = _receiver(tmp_path)
    try:
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=20) as sock:
            sock.sendall(b'POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"half":')  # then silence
            assert sock.recv(100) == b""  # the server hung up (before: it held the thread until the client left)
    finally:
        server.shutdown()
        server.server_close()


def test_webhook_replay_after_a_restart_is_refused(tmp_path):
    body = json.dumps({"entity": "model_version", "action": "created", "data": {"name": "b", "version": "1"}}).encode()
    headers = _signed("s3cret", body)
    for expected in (202, 200):  # the second receiver is a restarted watcher: the delivery is a replay
        server = _receiver(tmp_path)
        try:
            r = httpx.post(f"http://127.0.0.1:{server.server_address[1]}/", content=body, headers=headers)
            assert r.status_code == expected, r.text
        finally:
            server.shutdown()
            server.server_close()
    assert len(StateStore(tmp_path / "watch").drain()) == 1


def _project(root, rows: int = 60):
    (root / "data").mkdir(parents=True)
    _append(root, 0, rows)
    (root / "kollm.yaml").write_text(
        "project: watchdemo\ndata:\n  docs: {path: data/docs.jsonl}\nsteps:\n  - kind: prepare\n    name: prep\n    inputs: {source: docs}\n"
        "    config:\n      dataset: corpus\n      split: {eval_fraction: 0.1}\n      filters: {min_chars: 10}\n      dedup: {near: false}\n",
        encoding="utf-8",
    )
    return root


def _append(root, start: int, n: int) -> None:
    with open(root / "data" / "docs.jsonl", "a", encoding="utf-8") as f:
        for i in range(start, start + n):
            f.write(json.dumps({"text": KOREAN[i % 3].format(n=i)}, ensure_ascii=False) + "\n")


@pytest.fixture
def project(tmp_path):
    return _project(tmp_path / "proj")


def test_cycles_baseline_data_change_coalesce_and_outcomes(project):
    with WebhookReceiver() as alerts:
        settings = WatchSettings(project_dir=project, alert_webhook=alerts.url)
        first = run_cycle(settings)
        assert first.kind == "baseline"
        assert run_cycle(settings).kind == "idle"

        store = StateStore(settings.state_dir)
        store.push(Trigger(kind="webhook", detail="registry webhook model_version.created base 2"))  # arrived meanwhile
        _append(project, 100, 20)
        outcome = run_cycle(settings)
        assert outcome.kind == "no_new_challenger"  # a prepare-only pipeline registers nothing
        assert sorted(t.kind for t in outcome.triggers) == ["data", "webhook"]  # both handled by one run
        assert outcome.steps_run == ["prep"] and outcome.steps_cached == []
        assert run_cycle(settings).kind == "idle"  # the same change does not trigger twice

        manual = run_cycle(settings, manual=True)
        assert manual.kind == "no_new_challenger" and manual.steps_cached == ["prep"] and manual.steps_run == []
        texts = [a["text"] for a in alerts.received]
    assert len(texts) == 2 and "no new challenger" in texts[0] and "data changed" in texts[0]
    assert outcome.alert_delivered and outcome.mlflow_run_id

    from kollm.registry import client

    c = client(project)
    run = c.get_run(outcome.mlflow_run_id)
    assert (
        run.data.tags["kollm.watch.outcome"] == "no_new_challenger"
        and run.data.tags["kollm.watch.triggers"] == "data,webhook"
    )
    assert run.data.metrics["watch.steps_run"] == 1
    state = store.load()
    assert (
        state.running is None
        and state.pending == []
        and [h["kind"] for h in state.history] == ["no_new_challenger", "no_new_challenger"]
    )


def test_a_crashed_run_is_resumed_once_not_triggered_again(project):
    settings = WatchSettings(project_dir=project)
    assert run_cycle(settings).kind == "baseline"
    store = StateStore(settings.state_dir)
    _append(project, 200, 10)
    # a watcher detected the change, saved it as running and died mid-run
    state = store.load()
    from kollm.monitor.watch import data_digest

    state.data_digest = data_digest(project)[0]
    crashed = Trigger(kind="data", detail="data changed (before the crash)")
    state.running = Running(triggers=[crashed], started_at=time.time())
    store.save(state)
    resumed = run_cycle(settings)
    assert (
        resumed.kind == "no_new_challenger"
        and [t.id for t in resumed.triggers] == [crashed.id]
        and resumed.steps_run == ["prep"]
    )
    assert run_cycle(settings).kind == "idle"

    state = store.load()
    state.running = Running(triggers=[crashed], started_at=time.time(), attempts=3)  # it crashed the watcher 3 times
    store.save(state)
    gave_up = run_cycle(settings)
    assert gave_up.kind == "failed" and "gave up after 3 attempts" in gave_up.message
    assert store.load().running is None


def test_one_watcher_at_a_time(project):
    settings = WatchSettings(project_dir=project)
    with watcher_lock(settings.state_dir) as held:
        assert held
        assert run_cycle(settings).kind == "busy"
    assert run_cycle(settings).kind == "baseline"


def test_cli_watch_once(project):
    r = subprocess.run(
        [sys.executable, "-m", "kollm.cli", "watch", "--once", "--json"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["kind"] == "baseline"
    r = subprocess.run(
        [sys.executable, "-m", "kollm.cli", "watch", "--once", "--schedule", "0 3 * *"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "--schedule" in r.stderr and "Traceback" not in r.stderr


def test_long_running_watch_retrains_on_a_verified_registry_webhook(project):
    import threading

    from kollm.monitor.watch import watch

    from .conftest import free_port

    port = free_port()
    settings = WatchSettings(project_dir=project, webhook_secret="s3cret", webhook_port=port, model_name="watchdemo")
    stop = threading.Event()
    thread = threading.Thread(target=watch, args=(settings,), kwargs={"interval_s": 0.5, "stop": stop}, daemon=True)
    thread.start()
    store = StateStore(settings.state_dir)
    try:
        deadline = time.time() + 120
        while store.load().data_digest is None:  # the first cycle recorded its baseline
            assert time.time() < deadline and thread.is_alive()
            time.sleep(0.2)
        body = json.dumps(
            {
                "entity": "model_version_alias",
                "action": "created",
                "data": {"name": "base-ko", "alias": "latest", "version": "4"},
            }
        ).encode()
        assert (
            httpx.post(
                f"http://127.0.0.1:{port}/", content=body, headers=_signed("s3cret", body), timeout=30
            ).status_code
            == 202
        )
        while not store.load().history:
            assert time.time() < deadline and thread.is_alive()
            time.sleep(0.2)
    finally:
        stop.set()
        thread.join(timeout=120)
    outcome = store.load().history[0]
    assert outcome["kind"] == "no_new_challenger" and outcome["steps_run"] == ["prep"]  # the first pipeline run
    assert [t["detail"] for t in outcome["triggers"]] == ["registry webhook model_version_alias.created base-ko 4"]
    assert not thread.is_alive()


def test_a_rolled_back_challenger_is_not_rolled_out_again_unless_forced(project):
    """Found: `kollm watch --once --now` rolled out again the version its canary had rolled back minutes before."""
    from kollm.registry import client

    c = client(project)
    c.create_registered_model("watched")
    v = str(c.create_model_version("watched", source=(project / "data").as_uri()).version)
    c.set_registered_model_alias("watched", "challenger", v)
    c.set_model_version_tag("watched", v, "kollm.rollout.result", "rolled_back")
    c.set_model_version_tag("watched", v, "kollm.rollout.failed_analysis", "success_rate 0.5 < 0.95")
    settings = WatchSettings(project_dir=project, model_name="watched")
    assert run_cycle(settings).kind == "baseline"
    skipped = run_cycle(settings, manual=True)
    assert skipped.kind == "challenger_rolled_back" and skipped.version == v
    assert "success_rate 0.5" in skipped.message and "--force" in skipped.message
    forced = run_cycle(WatchSettings(project_dir=project, model_name="watched", force=True), manual=True)
    assert forced.kind == "registered" and forced.version == v  # (no --gateway: registered, not rolled out)


def test_cli_watch_logs_no_line_per_gateway_request(project):
    """Found: `kollm watch` printed ~120 `INFO httpx` lines a minute (one per gateway status poll)."""
    script = (
        "import logging, sys\nfrom kollm.cli import main\nsys.argv = ['kollm', 'watch', '--once']\n"
        "try:\n    main()\nfinally:\n    print('httpx-info', logging.getLogger('httpx').isEnabledFor(logging.INFO))"
    )
    r = subprocess.run([sys.executable, "-c", script], cwd=project, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "httpx-info False" in r.stdout, r.stdout


def test_long_running_watch_survives_a_gateway_outage(project, registered, tmp_path):  # noqa: F811
    """The gateway is down when a trigger arrives: the watcher keeps retrying with backoff (it exited with code 1
    before, its webhook receiver with it), alerts once for the outage and once when it ends, and runs the pending
    trigger when the gateway comes up."""
    import threading

    from kollm.monitor.watch import watch
    from tests.rollout.conftest import Server
    from tests.rollout.test_rollout import make_gateway

    from .conftest import free_port

    hook_port, gw_port = free_port(), free_port()
    with WebhookReceiver() as alerts:
        settings = WatchSettings(
            project_dir=project,
            webhook_secret="s3cret",
            webhook_port=hook_port,
            model_name="watchdemo",
            gateway=f"http://127.0.0.1:{gw_port}",  # nothing listens there yet
            alert_webhook=alerts.url,
        )
        stop = threading.Event()
        thread = threading.Thread(target=watch, args=(settings,), kwargs={"interval_s": 0.2, "stop": stop})
        thread.start()
        store = StateStore(settings.state_dir)
        try:
            deadline = time.time() + 120
            while store.load().data_digest is None:
                assert time.time() < deadline and thread.is_alive()
                time.sleep(0.1)
            _append(project, 500, 5)  # a data change: the next cycle asks the gateway whether a rollout runs
            while not alerts.received:
                assert time.time() < deadline and thread.is_alive()
                time.sleep(0.1)
            time.sleep(3)  # several retries (2 s backoff and more) pass without a second alert
            assert thread.is_alive() and len(alerts.received) == 1, alerts.received
            assert "cycles fail" in alerts.received[0]["text"] and str(gw_port) in alerts.received[0]["text"]
            body = json.dumps({"entity": "model_version", "action": "created", "data": {"name": "x"}}).encode()
            url = f"http://127.0.0.1:{hook_port}/"
            assert httpx.post(url, content=body, headers=_signed("s3cret", body), timeout=30).status_code == 202
            with Server(make_gateway(registered, tmp_path), port=gw_port):
                while not store.load().history:
                    assert time.time() < deadline and thread.is_alive()
                    time.sleep(0.1)
        finally:
            stop.set()
            thread.join(timeout=120)
        texts = [a["text"] for a in alerts.received]
        assert sum("recovered after" in t for t in texts) == 1 and sum("cycles fail" in t for t in texts) == 1, texts
    outcome = store.load().history[0]
    assert outcome["kind"] == "no_new_challenger" and {t["kind"] for t in outcome["triggers"]} == {"data", "webhook"}
