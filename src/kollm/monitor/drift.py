"""`kollm monitor drift`: does recent served traffic still look like the training data?

The current sample is the `features` of each generation in `.kollm/logs/inference/inference.jsonl` within a
time window (kollm serve writes them; kollm.monitor.features). The reference is the prepared training data (a
prepare step's dataset folder: train.parquet and stats.json), whose texts get the same text features. Per
feature:

    PSI   population stability index over bins at the reference's deciles (0.1: small shift, 0.25: significant);
          a value the reference takes often (a decile edge) gets a bin of its own, so point masses count
    KS    two-sample Kolmogorov-Smirnov statistic and p-value (scipy.stats.ks_2samp)

A feature has drifted when its PSI is over the threshold (default 0.25). With `embedding_model` (the model the
server embedded prompts with, `kollm serve --embedding-model`), the prompts' embeddings are also compared with the
reference texts' (MMD² and a permutation p-value, kollm.monitor.embeddings): drift when p < `alpha`. The result goes to
`.kollm/monitor/drift/latest.json` (read by `kollm monitor exporter` as Prometheus gauges), an HTML report beside
it, and MLflow metrics in the experiment `kollm-monitor` (a run per check, tagged kollm.monitor=drift).

Public API:
    psi(reference, current, bins=10) -> float
    check_drift(project_dir, reference=None, window="24h", embedding_model=None, ...) -> DriftResult
    find_reference(project_dir) -> Path        the newest prepared dataset under .kollm
"""

from __future__ import annotations

import html
import json
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from kollm.errors import ConfigError, KollmError, NotFound
from kollm.monitor.exporter import drift_latest_path
from kollm.monitor.features import TEXT_FEATURES, reference_texts, text_features

EPS = 1e-4
MONITOR_EXPERIMENT = "kollm-monitor"


@dataclass(frozen=True)
class FeatureDrift:
    psi: float
    ks_statistic: float
    ks_pvalue: float
    reference_mean: float
    current_mean: float
    drifted: bool
    reference_hist: list[float] = field(default_factory=list)  # share per PSI bin
    current_hist: list[float] = field(default_factory=list)
    bin_edges: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class EmbeddingDrift:
    model: str
    mmd2: float
    p_value: float
    reference_rows: int
    current_rows: int
    drifted: bool


@dataclass
class DriftResult:
    created_at: float
    window: str
    window_requests: int
    reference: str
    reference_rows: int
    threshold: float
    features: dict[str, FeatureDrift]
    report: str = ""
    mlflow_run_id: str | None = None
    embedding: EmbeddingDrift | None = None

    @property
    def drifted(self) -> list[str]:
        return [name for name, f in self.features.items() if f.drifted] + (
            ["embedding"] if self.embedding and self.embedding.drifted else []
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "drifted": self.drifted}


def _edges(reference: np.ndarray, bins: int) -> np.ndarray:
    """Inner bin edges at the reference's quantiles (duplicates dropped, so a discrete feature gets fewer bins)."""
    return np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))


def _shares(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Shares of `values` in 2k+1 bins around k edges: below e0, equal to e0, between e0 and e1, equal to e1, ...
    The equality bins keep a point mass (every training text 100% Hangul, no PII hits) apart from its neighbours."""
    index = np.searchsorted(edges, values, side="left") + np.searchsorted(edges, values, side="right")
    return np.bincount(index, minlength=2 * len(edges) + 1) / max(1, len(values))


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """Population stability index of `current` against `reference`: sum over bins of (c - r) * ln(c / r)."""
    reference, current = np.asarray(reference, dtype=float), np.asarray(current, dtype=float)
    edges = _edges(reference, bins)
    r = np.clip(_shares(reference, edges), EPS, None)
    c = np.clip(_shares(current, edges), EPS, None)
    return float(np.sum((c - r) * np.log(c / r)))


def _compare(reference: np.ndarray, current: np.ndarray, threshold: float, bins: int) -> FeatureDrift:
    from scipy.stats import ks_2samp

    edges = _edges(reference, bins)
    ks = ks_2samp(reference, current)
    value = psi(reference, current, bins)
    return FeatureDrift(
        psi=round(value, 6),
        ks_statistic=round(float(ks.statistic), 6),
        ks_pvalue=float(ks.pvalue),
        reference_mean=float(reference.mean()),
        current_mean=float(current.mean()),
        drifted=value > threshold,
        reference_hist=_shares(reference, edges).round(4).tolist(),
        current_hist=_shares(current, edges).round(4).tolist(),
        bin_edges=edges.tolist(),
    )


def parse_window(text: str) -> float:
    """ "24h", "30m", "7d", "90s" -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        value = float(text[:-1])
        unit = units[text[-1]]
    except (KeyError, ValueError, IndexError):
        raise ConfigError(f"--window {text!r}: expected a number and a unit (s, m, h, d), e.g. 24h") from None
    if value <= 0:
        raise ConfigError(f"--window {text!r}: must be more than 0")
    return value * unit


def load_window(log: Path, since: float) -> list[dict[str, Any]]:
    """The `features` of generations logged at or after `since` (epoch seconds), with the prompt's embedding
    (`_embedding`: {model, vector}) where the server logged one."""
    rows: list[dict[str, Any]] = []
    if not log.exists():
        return rows
    with open(log, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            features = record.get("features")
            if record.get("event") != "generation" or not isinstance(features, dict):
                continue
            if datetime.fromisoformat(record["ts"]).timestamp() >= since:
                rows.append(
                    {**features, "_embedding": record["embedding"]}
                    if isinstance(record.get("embedding"), dict)
                    else features
                )
    return rows


def find_reference(project_dir: Path) -> Path:
    """The newest prepared dataset folder (train.parquet beside stats.json) under <project>/.kollm."""
    found = [
        p.parent for p in (Path(project_dir) / ".kollm").rglob("train.parquet") if (p.parent / "stats.json").exists()
    ]
    if not found:
        raise NotFound(
            f"no prepared dataset (train.parquet + stats.json) under {Path(project_dir) / '.kollm'}",
            hint="run the pipeline first (`kollm run`) or pass --reference DATASET_DIR",
        )
    return max(found, key=lambda p: (p / "train.parquet").stat().st_mtime)


def load_reference(path: Path, *, max_rows: int = 5000, seed: int = 0) -> list[str]:
    """Prompt-side texts of a prepared dataset folder (or a .parquet / .jsonl file of `text` rows), at most max_rows."""
    import pandas as pd

    path = Path(path)
    if path.is_dir():
        stats_path, data = path / "stats.json", path / "train.parquet"
        if not data.exists() or not stats_path.exists():
            raise ConfigError(
                f"--reference {path}: not a prepared dataset folder (expected train.parquet and stats.json)"
            )
        kind = json.loads(stats_path.read_text(encoding="utf-8")).get("dataset", "corpus")
        frame = pd.read_parquet(data)
    elif path.suffix == ".parquet":
        kind, frame = "corpus", pd.read_parquet(path)
    elif path.suffix == ".jsonl":
        kind, frame = "corpus", pd.read_json(path, lines=True)
    else:
        raise ConfigError(f"--reference {path}: expected a prepared dataset folder, a .parquet or a .jsonl file")
    if kind == "corpus" and "text" not in frame.columns:
        raise ConfigError(f"--reference {path}: no `text` column")
    if len(frame) > max_rows:
        frame = frame.sample(n=max_rows, random_state=seed)
    return reference_texts(frame, kind)


def check_drift(
    project_dir: Path,
    reference: Path | None = None,
    *,
    window: str = "24h",
    threshold: float = 0.25,
    min_requests: int = 30,
    bins: int = 10,
    log: Path | None = None,
    track: bool = True,
    now: float | None = None,
    embedding_model: str | None = None,
    alpha: float = 0.01,
) -> DriftResult:
    """Compare the last `window` of served traffic with the reference; write latest.json, the HTML report and
    (track=True) MLflow metrics. Raises KollmError when the window has fewer than `min_requests` requests."""
    project_dir = Path(project_dir)
    seconds = parse_window(window)
    now = time.time() if now is None else now
    reference = Path(reference) if reference is not None else find_reference(project_dir)
    log = log or project_dir / ".kollm" / "logs" / "inference" / "inference.jsonl"
    rows = load_window(log, now - seconds)
    if len(rows) < min_requests:
        raise KollmError(
            f"only {len(rows)} served requests with features in the last {window} (in {log}); need {min_requests}",
            hint="wait for more traffic, widen --window or lower --min-requests",
        )
    texts = load_reference(reference)
    if not texts:
        raise ConfigError(f"--reference {reference}: no rows")
    ref_rows = [text_features(t) for t in texts]
    features = {}
    for name in TEXT_FEATURES:
        ref = np.array([r[name] for r in ref_rows], dtype=float)
        cur = np.array([r[name] for r in rows if name in r], dtype=float)
        if len(cur):
            features[name] = _compare(ref, cur, threshold, bins)
    result = DriftResult(
        created_at=now,
        window=window,
        window_requests=len(rows),
        reference=str(reference),
        reference_rows=len(texts),
        threshold=threshold,
        features=features,
        embedding=_embedding_drift(embedding_model, texts, rows, alpha, min_requests) if embedding_model else None,
    )
    out = drift_latest_path(project_dir).parent
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    report = out / f"drift-{stamp}.html"
    report.write_text(render_report(result), encoding="utf-8")
    result.report = str(report)
    if track:
        result.mlflow_run_id = log_to_mlflow(result, project_dir, report)
    _write_atomic(out / "latest.json", json.dumps(result.to_json(), indent=2))
    return result


def _embedding_drift(
    model: str, texts: list[str], rows: list[dict[str, Any]], alpha: float, min_requests: int
) -> EmbeddingDrift:
    from kollm.monitor.embeddings import MAX_SAMPLE, Embedder, mmd_test

    current = [r["_embedding"]["vector"] for r in rows if "_embedding" in r and r["_embedding"].get("model") == model]
    if len(current) < min_requests:
        others = sorted({r["_embedding"].get("model") for r in rows if "_embedding" in r} - {model})
        raise KollmError(
            f"only {len(current)} requests in the window carry a prompt embedding by {model!r}; need {min_requests}",
            hint=f"serve with `kollm serve MODEL --embedding-model {model}`"
            + (f" (the log has embeddings by {', '.join(map(str, others))})" if others else ""),
        )
    sample = (
        texts
        if len(texts) <= MAX_SAMPLE
        else [texts[i] for i in np.random.default_rng(0).choice(len(texts), MAX_SAMPLE, replace=False)]
    )
    reference = Embedder(model).embed(sample)
    mmd2, p_value = mmd_test(reference, np.array(current, dtype=float))
    return EmbeddingDrift(model, round(mmd2, 6), p_value, len(sample), len(current), p_value < alpha)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def log_to_mlflow(result: DriftResult, project_dir: Path, report: Path) -> str:
    """One MLflow run in the `kollm-monitor` experiment: drift.<feature>.psi / .ks metrics, the report as an artifact."""
    from mlflow.entities import Metric, Param, RunTag

    from kollm.pipeline.tracking import artifact_location
    from kollm.registry import client

    c = client(project_dir)
    exp = c.get_experiment_by_name(MONITOR_EXPERIMENT)
    exp_id = (
        exp.experiment_id
        if exp is not None
        else c.create_experiment(MONITOR_EXPERIMENT, artifact_location=artifact_location(c.tracking_uri, project_dir))
    )
    run = c.create_run(
        exp_id,
        run_name=f"drift {datetime.fromtimestamp(result.created_at, timezone.utc):%Y-%m-%d %H:%M}",
        tags={"kollm.monitor": "drift"},
    )
    ms = int(result.created_at * 1000)
    metrics = [
        Metric("drift.window_requests", result.window_requests, ms, 0),
        Metric("drift.features_drifted", len(result.drifted), ms, 0),
    ]
    for name, f in result.features.items():
        metrics += [Metric(f"drift.{name}.psi", f.psi, ms, 0), Metric(f"drift.{name}.ks", f.ks_statistic, ms, 0)]
    if result.embedding is not None:
        metrics += [
            Metric("drift.embedding.mmd2", result.embedding.mmd2, ms, 0),
            Metric("drift.embedding.p_value", result.embedding.p_value, ms, 0),
        ]
    params = [
        Param("window", result.window),
        Param("reference", result.reference[:500]),
        Param("threshold", str(result.threshold)),
    ]
    c.log_batch(
        run.info.run_id,
        metrics=metrics,
        params=params,
        tags=[RunTag("kollm.drifted", ",".join(result.drifted) or "none")],
    )
    c.log_artifact(run.info.run_id, str(report))
    c.set_terminated(run.info.run_id)
    return run.info.run_id


def render_report(result: DriftResult) -> str:
    """A self-contained HTML page: one row per feature, and reference vs current shares per bin."""
    when = datetime.fromtimestamp(result.created_at, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = (
        "<!doctype html><html lang=ko><head><meta charset=utf-8><title>kollm drift report</title><style>"
        "body{font-family:system-ui,'Noto Sans KR',sans-serif;margin:2em;max-width:1000px}td,th{padding:2px 8px;text-align:right}"
        "th:first-child,td:first-child{text-align:left}.drift{color:#b00;font-weight:bold}.bar{height:10px;display:inline-block}"
        ".ref{background:#999}.cur{background:#4a7bd0}table{border-collapse:collapse}</style></head><body>"
    )
    verdict = (
        f"<p class=drift>Drift on {', '.join(map(html.escape, result.drifted))}</p>"
        if result.drifted
        else "<p>No feature drifted past the threshold.</p>"
    )
    parts = [
        head,
        "<h1>Drift of served traffic against the training data</h1>",
        f"<p>{when}: {result.window_requests} requests in the last {html.escape(result.window)} against "
        f"{result.reference_rows} reference rows from <code>{html.escape(result.reference)}</code>; PSI threshold {result.threshold:g}.</p>",
        verdict,
        "<table><tr><th>feature</th><th>PSI</th><th>KS</th><th>KS p-value</th><th>reference mean</th><th>current mean</th><th></th></tr>",
    ]
    for name, f in result.features.items():
        flag = "<span class=drift>drifted</span>" if f.drifted else "ok"
        parts.append(
            f"<tr><td>{html.escape(name)}</td><td>{f.psi:.3f}</td><td>{f.ks_statistic:.3f}</td><td>{f.ks_pvalue:.3g}</td>"
            f"<td>{f.reference_mean:.3f}</td><td>{f.current_mean:.3f}</td><td>{flag}</td></tr>"
        )
    parts.append("</table>")
    if (e := result.embedding) is not None:
        flag = "<span class=drift>drifted</span>" if e.drifted else "ok"
        parts.append(
            f"<h2>Prompt embeddings</h2><p>by <code>{html.escape(e.model)}</code>: MMD² {e.mmd2:.4g}, permutation p-value "
            f"{e.p_value:.3g} ({e.current_rows} requests vs {e.reference_rows} reference texts): {flag}</p>"
        )
    for name, f in result.features.items():
        bounds = ["-inf", *(f"{e:g}" for e in f.bin_edges), "inf"]
        parts.append(
            f"<h2>{html.escape(name)}</h2><table><tr><th>bin</th><th>reference</th><th>current</th><th></th></tr>"
        )
        for i, (r, c) in enumerate(zip(f.reference_hist, f.current_hist)):
            label = f"= {bounds[i // 2 + 1]}" if i % 2 else f"({bounds[i // 2]}, {bounds[i // 2 + 1]})"
            parts.append(
                f"<tr><td>{label}</td><td>{r:.1%}</td><td>{c:.1%}</td><td style='text-align:left'>"
                f"<span class='bar ref' style='width:{200 * r:.0f}px'></span><br>"
                f"<span class='bar cur' style='width:{200 * c:.0f}px'></span></td></tr>"
            )
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
