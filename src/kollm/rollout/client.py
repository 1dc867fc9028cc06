"""What `kollm rollout ...` calls: HTTP requests to the admin endpoints of a running gateway.

The gateway URL defaults to $KOLLM_GATEWAY, else http://127.0.0.1:8000; the API key to $KOLLM_API_KEY.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import ValidationError

from kollm.errors import ConfigError, KollmError, NotFound
from kollm.rollout.analysis import (
    DEFAULT_ANALYSIS,
    DEFAULT_FAILURE_LIMIT,
    DEFAULT_MIN_REQUESTS,
    DEFAULT_PAUSE,
    DEFAULT_STEPS,
)
from kollm.rollout.state import ProbePrompt, RolloutConflict, RolloutSpec, parse_duration, parse_steps
from kollm.serve import API_KEY_ENV

DEFAULT_GATEWAY = "http://127.0.0.1:8000"
GATEWAY_ENV = "KOLLM_GATEWAY"

Command = Literal["status", "pause", "resume", "abort", "promote"]


def gateway_url(explicit: str | None = None) -> str:
    return (explicit or os.environ.get(GATEWAY_ENV) or DEFAULT_GATEWAY).rstrip("/")


def load_probe(path: Path) -> list[ProbePrompt]:
    """A JSONL file, one {"prompt": ..., "expect": ...} per line ("expect" optional)."""
    if not path.exists():
        raise ConfigError(f"--probe {path}: no such file")
    prompts = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            prompts.append(ProbePrompt.model_validate(json.loads(line)))
        except (ValueError, ValidationError) as e:
            first = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)
            raise ConfigError(
                f'--probe {path}, line {i}: expected {{"prompt": "...", "expect": "..."}} ({first})'
            ) from None
    if not prompts:
        raise ConfigError(f"--probe {path}: no prompts in the file")
    return prompts


def start(
    name: str,
    *,
    steps: str = DEFAULT_STEPS,
    pause: str = DEFAULT_PAUSE,
    analysis: str = DEFAULT_ANALYSIS,
    failure_limit: int = DEFAULT_FAILURE_LIMIT,
    min_requests: int = DEFAULT_MIN_REQUESTS,
    alert_webhook: str | None = None,
    probe: Path | None = None,
    judge_url: str | None = None,
    judge_model: str | None = None,
    judge_key_env: str | None = None,
    judge_calls: int = 16,
    judge_rubric: Path | None = None,
    gateway: str | None = None,
    api_key: str | None = None,
) -> dict[str, Any]:
    """Start rolling out the gateway's canary of NAME. The options are validated into a RolloutSpec here, so
    a bad one is named before anything is sent. Returns the status."""
    if alert_webhook:
        from kollm.monitor.alerts import check_webhook_url

        check_webhook_url(alert_webhook)
    judge = None
    if judge_url or judge_model:
        if not (judge_url and judge_model):
            raise ConfigError("--judge-url and --judge-model go together: the judge's endpoint and its model name")
        from kollm.eval.judge import load_rubric

        rubric = load_rubric(str(judge_rubric), Path.cwd()).model_dump() if judge_rubric else None
        judge = {
            "base_url": judge_url,
            "model": judge_model,
            "api_key_env": judge_key_env,
            "max_calls": judge_calls,
            "rubric": rubric,
        }
    elif judge_key_env or judge_rubric:
        raise ConfigError("--judge-key-env and --judge-rubric need --judge-url and --judge-model")
    spec = RolloutSpec.build(
        steps=parse_steps(steps),
        pause_s=parse_duration(pause),
        analysis=analysis,
        failure_limit=failure_limit,
        min_requests=min_requests,
        alert_webhook=alert_webhook,
        probe=[p.model_dump() for p in load_probe(probe)] if probe else [],
        judge=judge,
    )
    return _call("POST", "start", {"name": name, **spec.model_dump()}, gateway=gateway, api_key=api_key)


def command(
    cmd: Command, *, gateway: str | None = None, api_key: str | None = None, reason: str | None = None
) -> dict[str, Any]:
    """status | pause | resume | abort | promote; returns {"rollout": state or None, "gateway": {...}}."""
    if cmd == "status":
        return _call("GET", "status", None, gateway=gateway, api_key=api_key)
    body = (
        {"reason": reason} if cmd == "abort" and reason else {}
    )  # a JSON body: the admin API refuses non-JSON POSTs (CSRF)
    return _call("POST", cmd, body, gateway=gateway, api_key=api_key)


def _call(method: str, cmd: str, body: dict | None, *, gateway: str | None, api_key: str | None) -> dict[str, Any]:
    url = f"{gateway_url(gateway)}/admin/rollout/{cmd}"
    key = api_key or os.environ.get(API_KEY_ENV)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        r = httpx.request(method, url, json=body, headers=headers, timeout=60)
    except httpx.HTTPError as e:
        raise KollmError(
            f"cannot reach the gateway at {gateway_url(gateway)} ({type(e).__name__})",
            hint="start it with `kollm serve models:/NAME@champion --canary models:/NAME@challenger`, or pass --gateway URL",
        ) from None
    try:
        data = r.json()
    except ValueError:
        data = {}
    if r.status_code == 200:
        return data
    err = data.get("error", {}) if isinstance(data, dict) else {}
    message = err.get("message") or f"HTTP {r.status_code} from {url}"
    if r.status_code == 404 and not err:
        message = f"{gateway_url(gateway)} has no rollout admin endpoints; is it a gateway started with --canary?"
    if r.status_code == 400:
        raise ConfigError(message)
    if r.status_code == 404:
        raise NotFound(message, hint=err.get("hint"))
    if r.status_code == 409:
        raise RolloutConflict(message, hint=err.get("hint"))
    raise KollmError(message, hint=err.get("hint"))


def format_status(data: dict[str, Any]) -> str:
    """Human-readable lines for `kollm rollout status`."""
    gw = data["gateway"]
    if gw["canary_version"] is None:
        lines = [f"model {gw['model']}: version {gw['stable_version']} serves 100% (no canary)"]
    else:
        w = gw["canary_weight"]
        lines = [
            f"model {gw['model']}: stable version {gw['stable_version']} at {100 - w:g}%, canary version {gw['canary_version']} at {w:g}%"
        ]
    st = data.get("rollout")
    if st is None:
        lines.append(f"no rollout started (kollm rollout start {gw['model']})")
        return "\n".join(lines)
    spec = st["spec"]
    steps = ",".join(f"{w:g}" for w in spec["steps"])
    lines.append(
        f"rollout of version {st['canary_version']}: {st['status'].upper()}, step {st['step']}/{len(spec['steps'])} "
        f"(steps {steps}, pause {spec['pause_s']:g}s), failures {st['failures']}/{spec['failure_limit']}"
    )
    lines.append(f"  {st['message']}")
    if st["status"] == "progressing":
        left = st["window_started_at"] + spec["pause_s"] - time.time()
        lines.append(f"  next analysis in {max(left, 0):.0f}s ({spec['analysis']})")
    for h in st["history"][-5:]:
        res = h["result"]
        vals = ", ".join(
            f"{k}={v:g}"
            for k, v in res["values"].items()
            if k in ("success_rate", "p95_ms", "probe_pass_rate", "judge_win_rate")
        )
        lines.append(f"  step {h['step']} @ {h['weight']:g}%: {res['verdict']} ({res['requests']} requests; {vals})")
    for a in st["alerts"][-3:]:
        lines.append(f"  alert {'sent' if a['delivered'] else 'NOT sent: ' + str(a['error'])}")
    return "\n".join(lines)
