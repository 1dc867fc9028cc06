"""`kollm monitor exporter`: training and drift gauges read from a project's files at scrape time."""

from __future__ import annotations

import json
import math

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kollm.monitor.exporter import drift_latest_path, exporter_registry


def _samples(project) -> dict[tuple[str, tuple], float]:
    text = generate_latest(exporter_registry(project)).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def _write(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def test_training_gauges_follow_the_newest_record(tmp_path):
    logs = tmp_path / ".kollm" / "logs" / "training"
    assert _samples(tmp_path) == {}  # no logs yet: no series, no error
    base = {
        "ts": "2026-01-02T03:04:05.000+00:00",
        "level": "INFO",
        "component": "train",
        "event": "train_metrics",
        "step": "sft",
        "epoch": 0,
        "learning_rate": 1e-4,
        "grad_norm": 0.5,
        "tokens_per_s": 1000.0,
        "tokens": 10,
    }
    params = {**base, "event": "params", "params": {"a": 1}}
    _write(
        logs / "sft.jsonl",
        [
            {**base, "global_step": 1, "loss": 3.0},
            params,
            {**base, "global_step": 2, "loss": 2.5, "gpu_memory_gb": 2.0},
        ],
    )
    with open(logs / "sft.jsonl", "a") as f:
        f.write('{"ts": "2026-01-02T03:04:06", "global_step": 3, "lo')  # a record being written
    s = _samples(tmp_path)
    assert s[("kollm_training_loss", (("step_name", "sft"),))] == 2.5
    assert s[("kollm_training_step", (("step_name", "sft"),))] == 2
    assert s[("kollm_training_gpu_memory_bytes", (("step_name", "sft"),))] == 2 * 1024**3
    assert s[("kollm_training_last_log_timestamp_seconds", (("step_name", "sft"),))] == 1767323045.0
    with open(logs / "sft.jsonl", "a") as f:
        f.write("\n")
    _write(logs / "sft.jsonl", [{**base, "global_step": 4, "loss": float("nan")}])
    _write(logs / "cpt.jsonl", [{**base, "step": "cpt", "global_step": 9, "loss": 4.0}])
    s = _samples(tmp_path)
    assert math.isnan(s[("kollm_training_loss", (("step_name", "sft"),))])
    assert s[("kollm_training_step", (("step_name", "sft"),))] == 4
    assert s[("kollm_training_loss", (("step_name", "cpt"),))] == 4.0


def test_drift_gauges_come_from_the_last_report(tmp_path):
    path = drift_latest_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(
        json.dumps(
            {
                "created_at": 1700000000.0,
                "window_requests": 120,
                "features": {
                    "hangul_ratio": {"psi": 0.4, "ks_statistic": 0.5, "ks_pvalue": 1e-6, "drifted": True},
                    "prompt_chars": {"psi": 0.01, "ks_statistic": 0.05, "ks_pvalue": 0.9, "drifted": False},
                },
            }
        )
    )
    s = _samples(tmp_path)
    assert s[("kollm_drift_psi", (("feature", "hangul_ratio"),))] == 0.4
    assert s[("kollm_drift_detected", (("feature", "hangul_ratio"),))] == 1
    assert s[("kollm_drift_detected", (("feature", "prompt_chars"),))] == 0
    assert s[("kollm_drift_window_requests", ())] == 120
    assert s[("kollm_drift_last_run_timestamp_seconds", ())] == 1700000000.0


def test_cli_exporter_serves_metrics(tmp_path):
    import subprocess
    import sys
    import time

    import httpx

    from .conftest import free_port

    # a line of a kollm before kollm.jsonlog (`timestamp`, `step_name`, `step`: the optimizer step) still reads
    _write(
        tmp_path / ".kollm" / "logs" / "training" / "cpt.jsonl",
        [{"timestamp": "2026-01-01T00:00:00+00:00", "step_name": "cpt", "step": 5, "loss": 3.25}],
    )
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kollm.cli", "monitor", "exporter", "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < deadline, (
                proc.stdout.read() if proc.poll() is not None else "timeout"
            )
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
                break
            except httpx.HTTPError:
                time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert 'kollm_training_loss{step_name="cpt"} 3.25' in text
