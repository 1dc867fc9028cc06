"""The shipped Grafana dashboards: generated from kollm.monitor.grafana, every query parses (promtool), and every
metric a panel names is one kollm exports (a live /metrics of the canary gateway and of the exporter)."""

from __future__ import annotations

import json
import re
import subprocess
import time

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from kollm.monitor.grafana import DASHBOARDS, panel_queries, render
from kollm.monitor.prometheus import DASHBOARDS_DIR, dashboard_files, rule_files

from .conftest import PROMTOOL, free_port, needs_promtool

VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "$job": ".*",
    "$model_version": ".*",
    "$rollout": ".*",
    "$step_name": ".*",
    "$feature": ".*",
}
_NAME = re.compile(r"\bkollm[a-z0-9_:]*")


def _substitute(expr: str) -> str:
    for var in sorted(VARIABLES, key=len, reverse=True):
        expr = expr.replace(var, VARIABLES[var])
    assert "$" not in expr, expr
    return expr


def _all_queries() -> list[tuple[str, str, str]]:
    out = []
    for name, d in DASHBOARDS.items():
        out += [(name, title, expr) for title, expr in panel_queries(d)]
        out += [
            (name, f"variable {v['name']}", v["definition"]) for v in d["templating"]["list"] if v["type"] == "query"
        ]
    return out


def test_shipped_json_is_what_the_generator_writes():
    assert [p.name for p in dashboard_files()] == sorted(DASHBOARDS)
    for name, dashboard in DASHBOARDS.items():
        assert (DASHBOARDS_DIR / name).read_text(encoding="utf-8") == render(dashboard), (
            f"run `python -m kollm.monitor.grafana` ({name})"
        )
        loaded = json.loads((DASHBOARDS_DIR / name).read_text(encoding="utf-8"))
        assert (
            loaded["uid"].startswith("kollm-")
            and loaded["panels"]
            and len({p["id"] for p in loaded["panels"]}) == len(loaded["panels"])
        )


@needs_promtool
def test_every_panel_query_parses(tmp_path):
    rules = [
        {"record": f"dashboard_query_{i}", "expr": _substitute(expr)}
        for i, (_, title, expr) in enumerate(_all_queries())
        if not title.startswith("variable")
    ]
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    r = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rules)} rules found" in r.stdout


@needs_promtool
def test_a_broken_query_is_caught(tmp_path):
    path = tmp_path / "panels.yml"
    path.write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {"name": "p", "rules": [{"record": "x", "expr": "sum by (job (rate(kollm_requests_total[1m]))"}]}
                ]
            }
        )
    )
    assert subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, timeout=60).returncode != 0


def _exported(text: str) -> set[str]:
    names = set()
    for fam in text_string_to_metric_families(text):
        names.add(fam.name)
        names |= {s.name for s in fam.samples}
        # a labelled family with no children yet is exported as HELP/TYPE only: its sample names follow from the type
        names |= {
            fam.name + suffix
            for suffix in {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(fam.type, ())
        }
    return names


@pytest.fixture
def live_metrics(tmp_path) -> set[str]:
    """Metric names from a live canary gateway (serving, gateway and rollout metrics) and a live exporter."""
    from prometheus_client import start_http_server

    from kollm.monitor.exporter import exporter_registry
    from kollm.rollout.api import attach_rollout
    from kollm.serve import create_app
    from kollm.serve.gateway import Arm, Gateway
    from tests.rollout.conftest import Server
    from tests.serve.fake_engine import FakeEngine

    arms = [
        Arm(create_app(FakeEngine(), model_name="m", model_version=v), version=v, model_name="m") for v in ("1", "2")
    ]
    gateway = Gateway(*arms)
    attach_rollout(gateway, project_dir=tmp_path, model_name="m")
    logs = tmp_path / ".kollm" / "logs" / "training"
    logs.mkdir(parents=True)
    (logs / "sft.jsonl").write_text(
        json.dumps(
            {
                "ts": "2026-01-01T00:00:00+00:00",
                "level": "INFO",
                "component": "train",
                "event": "train_metrics",
                "step": "sft",
                "global_step": 1,
                "loss": 2.0,
                "learning_rate": 1e-4,
                "grad_norm": 1.0,
                "tokens_per_s": 10.0,
                "gpu_memory_gb": 1.0,
            }
        )
        + "\n"
    )
    drift = tmp_path / ".kollm" / "monitor" / "drift" / "latest.json"
    drift.parent.mkdir(parents=True)
    drift.write_text(
        json.dumps(
            {
                "created_at": time.time(),
                "window_requests": 1,
                "features": {"hangul_ratio": {"psi": 0.1, "ks_statistic": 0.1, "ks_pvalue": 0.5, "drifted": False}},
            }
        )
    )
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=exporter_registry(tmp_path))
    try:
        with Server(gateway) as gw:
            r = httpx.post(
                gw.url + "/v1/completions", json={"model": "m", "prompt": "안녕", "max_tokens": 2}, timeout=30
            )
            assert r.status_code == 200
            names = _exported(httpx.get(gw.url + "/metrics", timeout=30).text)
        names |= _exported(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text)
    finally:
        server.shutdown()
    return names


def test_every_metric_a_panel_names_is_exported(live_metrics):
    recorded = {
        r["record"]
        for f in rule_files()
        for g in yaml.safe_load(f.read_text())["groups"]
        for r in g["rules"]
        if "record" in r
    }
    missing = []
    for dashboard, title, expr in _all_queries():
        for name in _NAME.findall(expr):
            known = recorded if ":" in name else live_metrics
            if name not in known:
                missing.append(f"{dashboard} / {title}: {name}")
    assert missing == []
    used = {n for _, _, e in _all_queries() for n in _NAME.findall(e)}
    assert {
        "kollm_requests_total",
        "kollm_gateway_requests_total",
        "kollm_rollout_canary_weight_percent",
        "kollm_training_loss",
        "kollm_drift_psi",
    } <= used
    assert "kollm_request_latency_seconds_bucket" in live_metrics and "kollm_not_a_metric" not in live_metrics
