"""Read pipeline runs back from MLflow for `kollm runs` and `kollm show`."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

from kollm.config import load_config
from kollm.errors import NotFound
from kollm.pipeline.sweep import trial_table
from kollm.pipeline.tracking import client_for, tracking_uri


@dataclass(frozen=True)
class RunRow:
    run_id: str
    started: str  # for tables: local time, to the second
    status: str
    steps: int
    cache_hits: int
    duration: str  # for tables: "12.3s"
    start_ms: int | None = None
    end_ms: int | None = None

    def to_json(self) -> dict[str, Any]:
        """`kollm runs --json` / `show --json`'s run: full id, ISO 8601 times with their zone, seconds as numbers."""
        return {
            "run_id": self.run_id,
            "status": self.status,
            "started": _iso(self.start_ms),
            "ended": _iso(self.end_ms),
            "duration_s": (self.end_ms - self.start_ms) / 1000 if self.start_ms and self.end_ms else None,
            "steps": self.steps,
            "cache_hits": self.cache_hits,
        }


@dataclass(frozen=True)
class StepRow:
    name: str
    kind: str
    status: str
    cache: str
    duration: str
    key: str
    outputs: str
    metrics: str
    sweep_metric: str = ""  # a swept step: "eval_loss (min)"
    trials: list[dict[str, Any]] = field(default_factory=list)  # its trials, best first (kollm.pipeline.sweep)
    run_id: str = ""
    cache_key: str = ""  # the full key (`key` is cut for tables)
    duration_s: float | None = None
    metric_values: dict[str, float] = field(default_factory=dict)
    output_digests: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """`kollm show --json`'s step: numbers as numbers, the full key and digests."""
        return {
            "name": self.name,
            "kind": self.kind,
            "status": self.status,
            "run_id": self.run_id,
            "cache_hit": self.cache == "hit",
            "duration_s": self.duration_s,
            "key": self.cache_key,
            "outputs": self.output_digests,
            "metrics": self.metric_values,
            "sweep_metric": self.sweep_metric,
            "trials": self.trials,
        }


def _fmt_time(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _iso(ms: int | None) -> str | None:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds") if ms else None


def _fmt_duration(start: int | None, end: int | None) -> str:
    return f"{(end - start) / 1000:.1f}s" if start and end else "-"


def _open(path: str | Path | None):
    cfg, file = load_config(path)
    client = client_for(tracking_uri(file.parent, cfg))
    exp = client.get_experiment_by_name(cfg.tracking.experiment or cfg.project)
    return client, exp


def list_runs(path: str | Path | None = None, limit: int = 20) -> list[RunRow]:
    client, exp = _open(path)
    if exp is None:
        return []
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string="tags.`kollm.pipeline` = 'true'",
        max_results=limit,
        order_by=["attributes.start_time DESC"],
    )
    rows = []
    for r in runs:
        m = r.data.metrics
        if "steps" in m:  # a finished run logged its counts
            steps, hits = int(m["steps"]), int(m.get("cache_hits", 0))
        else:  # failed, killed or still running: count its step runs
            children = client.search_runs(
                [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{r.info.run_id}'", max_results=1000
            )
            steps, hits = len(children), sum(c.data.tags.get("kollm.cache_hit") == "true" for c in children)
        rows.append(
            RunRow(
                run_id=r.info.run_id,
                started=_fmt_time(r.info.start_time),
                status=r.info.status,
                steps=steps,
                cache_hits=hits,
                duration=_fmt_duration(r.info.start_time, r.info.end_time),
                start_ms=r.info.start_time,
                end_ms=r.info.end_time,
            )
        )
    return rows


def show_run(path: str | Path | None, run_id: str) -> tuple[RunRow, list[StepRow]]:
    client, exp = _open(path)
    if exp is None:
        raise NotFound("no runs yet in this project; `kollm run` starts one")
    pipelines = client.search_runs(
        [exp.experiment_id],
        filter_string="tags.`kollm.pipeline` = 'true'",
        max_results=1000,
        order_by=["attributes.start_time DESC"],
    )
    if run_id == "latest":
        matches = pipelines[:1]
    else:
        matches = [r for r in pipelines if r.info.run_id.startswith(run_id)]
    if len(matches) != 1:
        what = "no run" if not matches else f"{len(matches)} runs"
        raise NotFound(
            f"{what} matching '{run_id}'", hint="`kollm runs` lists run ids; use a longer prefix or 'latest'"
        )
    run = matches[0]
    children = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'",
        max_results=1000,
        order_by=["attributes.start_time ASC"],
    )
    steps = []
    for c in children:
        tags, m = c.data.tags, c.data.metrics
        outputs = ", ".join(
            f"{k.split('.')[2]}={v.removeprefix('sha256:')[:12]}"
            for k, v in sorted(tags.items())
            if k.startswith("kollm.output.")
        )
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(m.items()) if k != "duration_s")
        steps.append(
            StepRow(
                name=tags.get("kollm.step", c.info.run_name),
                kind=tags.get("kollm.kind", "?"),
                status=c.info.status,
                cache="hit" if tags.get("kollm.cache_hit") == "true" else "miss",
                duration=f"{m['duration_s']:.2f}s" if "duration_s" in m else "-",
                key=tags.get("kollm.cache_key", "")[:12],
                outputs=outputs,
                metrics=metrics[:200],
                sweep_metric=tags.get("kollm.sweep.metric", ""),
                trials=trial_table(tags),
                run_id=c.info.run_id,
                cache_key=tags.get("kollm.cache_key", ""),
                duration_s=m.get("duration_s"),
                metric_values={k: v for k, v in sorted(m.items()) if k != "duration_s"},
                output_digests={
                    k.split(".")[2]: v
                    for k, v in sorted(tags.items())
                    if k.startswith("kollm.output.") and k.endswith(".digest")
                },
            )
        )
    info = RunRow(
        run.info.run_id,
        _fmt_time(run.info.start_time),
        run.info.status,
        len(steps),
        sum(s.cache == "hit" for s in steps),
        _fmt_duration(run.info.start_time, run.info.end_time),
        run.info.start_time,
        run.info.end_time,
    )
    return info, steps
