"""`kollm monitor exporter`: Prometheus metrics for training and drift, read from a project's files at scrape time.

Training steps write `train_metrics` lines (kollm.jsonlog) to `.kollm/logs/training/<step>.jsonl` and
`kollm monitor drift` writes its last result to `.kollm/monitor/drift/latest.json`. This exporter turns the
newest record of each into gauges, so Prometheus can alert on a NaN loss or drift without the training process
serving HTTP itself. Nothing is cached: every scrape reads the files' tails.

    kollm_training_loss{step_name}                         last logged loss (NaN stays NaN)
    kollm_training_step{step_name}                         last logged optimizer step
    kollm_training_learning_rate{step_name}
    kollm_training_grad_norm{step_name}
    kollm_training_tokens_per_second{step_name}
    kollm_training_gpu_memory_bytes{step_name}             peak GPU memory the step logged (CUDA only)
    kollm_training_last_log_timestamp_seconds{step_name}   when the last record was written
    kollm_drift_psi{feature}                               population stability index, recent traffic vs training data
    kollm_drift_ks_statistic{feature}                      two-sample Kolmogorov-Smirnov statistic
    kollm_drift_ks_pvalue{feature}
    kollm_drift_detected{feature}                          1 when the feature is over the drift threshold (feature
                                                           "embedding": the prompt-embedding test, when it ran)
    kollm_drift_embedding_mmd2, kollm_drift_embedding_pvalue   the prompt-embedding two-sample test
    kollm_drift_window_requests                            requests in the compared window
    kollm_drift_last_run_timestamp_seconds                 when `kollm monitor drift` last ran
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

TAIL_BYTES = 64 * 1024
_TRAINING_GAUGES = {
    "loss": ("kollm_training_loss", "Last logged training loss.", 1.0),
    "global_step": ("kollm_training_step", "Last logged optimizer step.", 1.0),
    "learning_rate": ("kollm_training_learning_rate", "Last logged learning rate.", 1.0),
    "grad_norm": ("kollm_training_grad_norm", "Last logged gradient norm (before clipping).", 1.0),
    "tokens_per_s": ("kollm_training_tokens_per_second", "Last logged training throughput in tokens per second.", 1.0),
    "gpu_memory_gb": ("kollm_training_gpu_memory_bytes", "Peak GPU memory the training step logged.", 1024.0**3),
}


def drift_latest_path(project_dir: Path) -> Path:
    return Path(project_dir) / ".kollm" / "monitor" / "drift" / "latest.json"


def last_record(path: Path, *, required: str = "loss") -> dict[str, Any] | None:
    """The newest JSON line of `path` that has the key `required` (a partial last line is skipped)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - TAIL_BYTES))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    for line in reversed(tail.splitlines()):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and required in record:
            return record
    return None


def _current(record: dict[str, Any]) -> dict[str, Any]:
    """A training line of kollm before the one log schema (`timestamp`, `step_name`, the optimizer step as `step`)
    in today's names (`ts`, `step`, `global_step`)."""
    if "step_name" not in record and "timestamp" not in record:
        return record
    return {**record, "ts": record.get("timestamp"), "step": record.get("step_name"), "global_step": record.get("step")}


def _timestamp(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class TrainingCollector(Collector):
    """Gauges from the newest record of each training log of a project."""

    def __init__(self, project_dir: Path):
        self.logs = Path(project_dir) / ".kollm" / "logs" / "training"

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = {
            key: GaugeMetricFamily(name, doc, labels=["step_name"]) for key, (name, doc, _) in _TRAINING_GAUGES.items()
        }
        stamp = GaugeMetricFamily(
            "kollm_training_last_log_timestamp_seconds",
            "When the training step wrote its last record.",
            labels=["step_name"],
        )
        for path in sorted(self.logs.glob("*.jsonl")) if self.logs.is_dir() else []:
            record = last_record(path)
            if record is None:
                continue
            record = _current(record)
            step_name = str(record.get("step") or path.stem)
            for key, (_, _, scale) in _TRAINING_GAUGES.items():
                value = _number(record.get(key))
                if value is not None:
                    families[key].add_metric([step_name], value * scale if math.isfinite(value) else value)
            ts = _timestamp(record.get("ts"))
            stamp.add_metric([step_name], ts if ts is not None else path.stat().st_mtime)
        yield from families.values()
        yield stamp


class DriftCollector(Collector):
    """Gauges from the last `kollm monitor drift` result of a project."""

    def __init__(self, project_dir: Path):
        self.path = drift_latest_path(project_dir)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        psi = GaugeMetricFamily(
            "kollm_drift_psi",
            "Population stability index of a feature, recent traffic vs the training data.",
            labels=["feature"],
        )
        ks = GaugeMetricFamily(
            "kollm_drift_ks_statistic", "Two-sample Kolmogorov-Smirnov statistic of a feature.", labels=["feature"]
        )
        pvalue = GaugeMetricFamily(
            "kollm_drift_ks_pvalue",
            "p-value of the two-sample Kolmogorov-Smirnov test of a feature.",
            labels=["feature"],
        )
        detected = GaugeMetricFamily(
            "kollm_drift_detected", "1 when the feature drifted past the threshold, else 0.", labels=["feature"]
        )
        window = GaugeMetricFamily("kollm_drift_window_requests", "Requests in the compared window of recent traffic.")
        last = GaugeMetricFamily("kollm_drift_last_run_timestamp_seconds", "When `kollm monitor drift` last ran.")
        mmd = GaugeMetricFamily(
            "kollm_drift_embedding_mmd2", "MMD² between served prompts' and the training texts' embeddings."
        )
        mmd_p = GaugeMetricFamily("kollm_drift_embedding_pvalue", "Permutation p-value of the embedding MMD² test.")
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict):
            for name, f in data.get("features", {}).items():
                psi.add_metric([name], float(f["psi"]))
                ks.add_metric([name], float(f["ks_statistic"]))
                pvalue.add_metric([name], float(f["ks_pvalue"]))
                detected.add_metric([name], 1.0 if f["drifted"] else 0.0)
            if isinstance(e := data.get("embedding"), dict):
                detected.add_metric(["embedding"], 1.0 if e["drifted"] else 0.0)
                mmd.add_metric([], float(e["mmd2"]))
                mmd_p.add_metric([], float(e["p_value"]))
            window.add_metric([], float(data.get("window_requests", 0)))
            last.add_metric([], float(data.get("created_at", time.time())))
        yield from (psi, ks, pvalue, detected, window, last, mmd, mmd_p)


def exporter_registry(project_dir: Path) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(TrainingCollector(project_dir))
    registry.register(DriftCollector(project_dir))
    return registry


def run_exporter(project_dir: Path, *, host: str = "127.0.0.1", port: int = 9464) -> None:
    """Serve /metrics for `project_dir` on host:port until interrupted."""
    import logging

    from prometheus_client import start_http_server

    server, thread = start_http_server(port, addr=host, registry=exporter_registry(project_dir))
    logging.getLogger("kollm.monitor").info("exporter for %s on http://%s:%d/metrics", project_dir, host, port)
    try:
        while thread.is_alive():
            thread.join(1.0)
    finally:
        server.shutdown()
