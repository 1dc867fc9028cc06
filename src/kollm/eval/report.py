"""The evaluation report: training loss curves, metric tables, the gate, and the candidate beside the champion.

One self-contained HTML file (inline SVG charts, no scripts, no network), plus the data behind it in
metrics.json. Training curves come from the upstream training steps' MLflow metric history, or from their
JSON-lines logs under .kollm/logs/training/ when MLflow has only the final value (a cached step).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kollm.eval.gate import GateDecision
from kollm.eval.generation import CaseResult
from kollm.eval.judge import JudgeResult

TRAINING_KINDS = ("cpt", "sft", "align")
LOWER_IS_BETTER = ("perplexity", "nll")


@dataclass
class ModelEval:
    """One model's results on one eval set (what the eval cache stores)."""

    label: str  # "candidate", "champion (v3)"
    model_digest: str
    eval_digest: str
    metrics: dict[str, float]
    counts: dict[str, int] = field(default_factory=dict)
    cases: list[CaseResult] = field(default_factory=list)
    version: str | None = None  # registered version, for references

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelEval:
        cases = [CaseResult(**c) for c in data.get("cases", [])]
        return cls(**{**data, "cases": cases})


@dataclass(frozen=True)
class Curve:
    label: str
    points: list[tuple[float, float]]


# --- training curves ----------------------------------------------------------------------------------------


def curves_from_mlflow(client: Any, step_name: str, run_id: str) -> list[Curve]:
    """Loss-like metrics with more than one logged point in a step's MLflow run."""
    run = client.get_run(run_id)
    out = []
    for key in sorted(run.data.metrics):
        if "loss" not in key:
            continue
        history = client.get_metric_history(run_id, key)
        if len(history) > 1:
            points = sorted((float(m.step), float(m.value)) for m in history if math.isfinite(m.value))
            out.append(Curve(f"{step_name}: {key}", points))
    return out


def curves_from_log(step_name: str, log_file: Path) -> list[Curve]:
    """The last run recorded in a training JSON-lines log (a restart from step 0 begins a new run)."""
    if not log_file.is_file():
        return []
    runs: list[list[tuple[int, dict[str, Any]]]] = [[]]
    for line in log_file.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict):
            continue
        step = rec.get("global_step", rec.get("step"))  # `step`: the optimizer step in logs before kollm.jsonlog
        if not isinstance(step, int):
            continue
        if runs[-1] and step < runs[-1][-1][0] and step <= 1:
            runs.append([])
        runs[-1].append((step, rec))
    records = runs[-1]
    keys = sorted({k for _, r in records for k, v in r.items() if "loss" in k and isinstance(v, (int, float))})
    out = []
    for key in keys:
        points = [
            (float(step), float(r[key]))
            for step, r in records
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
        ]
        if len(points) > 1:
            out.append(Curve(f"{step_name}: {key}", points))
    return out


def training_curves(upstream: Sequence[Any], client: Any, logs_dir: Path) -> list[Curve]:
    """Curves of every upstream training step (StepRecords of kinds cpt, sft, align)."""
    curves: list[Curve] = []
    for record in upstream:
        if record.kind not in TRAINING_KINDS:
            continue
        found = curves_from_mlflow(client, record.name, record.run_id) if record.run_id else []
        curves.extend(found or curves_from_log(record.name, logs_dir / f"{record.name}.jsonl"))
    return curves


# --- HTML -------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,'Apple SD Gothic Neo','Noto Sans KR',sans-serif;margin:2rem;color:#1d232a;max-width:1100px}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #dde;padding-bottom:.3rem}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}td,th{border:1px solid #dde;padding:.3rem .6rem;text-align:left;vertical-align:top}
th{background:#f4f6fa}.num{text-align:right;font-variant-numeric:tabular-nums}.pass{color:#11772d;font-weight:600}
.fail{color:#b3261e;font-weight:600}.skip{color:#8a6d00;font-weight:600}.better{color:#11772d}.worse{color:#b3261e}
.verdict{font-size:1.2rem;padding:.6rem 1rem;border-radius:6px;display:inline-block}
.verdict.pass{background:#e7f6eb}.verdict.fail{background:#fbe9e7}pre{white-space:pre-wrap;margin:0;font-size:.85rem}
.muted{color:#667}
"""

_COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"]


def _e(x: Any) -> str:
    return html.escape(str(x))


def _num(x: float | None) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


def svg_chart(curves: Sequence[Curve], width: int = 720, height: int = 260) -> str:
    """A line chart of the curves (shared axes) as inline SVG."""
    pts = [p for c in curves for p in c.points]
    if not pts:
        return ""
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    left, right, top, bottom = 56, 12, 12, 28

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * (height - top - bottom)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" aria-label="training loss">'
    ]
    parts.append(
        f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" fill="none" stroke="#ccd"/>'
    )
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        parts.append(
            f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" font-size="11" text-anchor="end" fill="#667">{_num(y)}</text>'
        )
    for i in range(5):
        x = x0 + (x1 - x0) * i / 4
        parts.append(
            f'<text x="{sx(x):.1f}" y="{height - 8}" font-size="11" text-anchor="middle" fill="#667">{x:.0f}</text>'
        )
    for i, curve in enumerate(curves):
        color = _COLORS[i % len(_COLORS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in curve.points)
        parts.append(
            f'<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{path}"><title>{_e(curve.label)}</title></polyline>'
        )
    parts.append("</svg>")
    legend = " ".join(
        f'<span style="color:{_COLORS[i % len(_COLORS)]}">&#9632;</span> {_e(c.label)} '
        f'<span class="muted">({_num(c.points[0][1])} &rarr; {_num(c.points[-1][1])}, {len(c.points)} points)</span><br>'
        for i, c in enumerate(curves)
    )
    return "".join(parts) + f"<p>{legend}</p>"


def _delta_class(metric: str, delta: float) -> str:
    if delta == 0:
        return ""
    lower = metric.split(".")[-1] in LOWER_IS_BETTER
    return "better" if (delta < 0) == lower else "worse"


def render(
    *,
    title: str,
    subtitle: str,
    candidate: ModelEval,
    references: dict[str, ModelEval | None],
    gate: GateDecision | None,
    curves: Sequence[Curve],
    max_cases: int = 50,
    judge: JudgeResult | None = None,
) -> str:
    refs = {alias: r for alias, r in references.items() if r is not None}
    out = [
        f"<!doctype html><html lang='ko'><head><meta charset='utf-8'><title>{_e(title)}</title><style>{_CSS}</style></head><body>"
    ]
    out.append(f"<h1>{_e(title)}</h1><p class='muted'>{_e(subtitle)}</p>")
    if gate is not None:
        verdict = "pass" if gate.passed else "fail"
        out.append(f"<div class='verdict {verdict}'>Quality gate: {'PASSED' if gate.passed else 'FAILED'}</div>")
        out.append("<table><tr><th>rule</th><th>result</th><th>candidate</th><th>bound</th><th>why</th></tr>")
        for o in gate.outcomes:
            out.append(
                f"<tr><td><code>{_e(o.rule)}</code></td><td class='{o.status}'>{o.status.upper()}</td>"
                f"<td class='num'>{_num(o.value)}</td><td class='num'>{_num(o.bound)}</td><td>{_e(o.reason)}</td></tr>"
            )
        out.append("</table>")
    else:
        out.append("<p class='muted'>No gate rules configured.</p>")
    missing = [alias for alias, r in references.items() if r is None]
    if missing:
        out.append(f"<p class='muted'>Not registered yet (nothing to compare with): {_e(', '.join(missing))}</p>")

    out.append("<h2>Metrics</h2><table><tr><th>metric</th><th>candidate</th>")
    for alias, r in refs.items():
        out.append(f"<th>{_e(r.label)}</th><th>&Delta; vs {_e(alias)}</th>")
    out.append("<th>cases</th></tr>")
    for metric in sorted(candidate.metrics):
        value = candidate.metrics[metric]
        out.append(f"<tr><td>{_e(metric)}</td><td class='num'>{_num(value)}</td>")
        for r in refs.values():
            ref = r.metrics.get(metric)
            delta = None if ref is None else value - ref
            cls = "" if delta is None else _delta_class(metric, delta)
            sign = "" if delta is None or delta < 0 else "+"
            out.append(f"<td class='num'>{_num(ref)}</td><td class='num {cls}'>{sign}{_num(delta)}</td>")
        out.append(f"<td class='num'>{candidate.counts.get(metric, '')}</td></tr>")
    out.append(
        "</table><p class='muted'>perplexity/nll: lower is better; exact/contains/regex: fraction of cases (0–1); chrf: sacrebleu chrF (0–100).</p>"
    )

    out.append("<h2>Training loss</h2>")
    if not curves:
        out.append("<p class='muted'>No training steps upstream of this evaluation (or no loss history).</p>")
    by_step: dict[str, list[Curve]] = {}
    for curve in curves:  # one chart per training step: CPT, SFT and DPO losses live on different scales
        by_step.setdefault(curve.label.split(":")[0], []).append(curve)
    for step, step_curves in by_step.items():
        out.append(f"<h3>{_e(step)}</h3>{svg_chart(step_curves)}")

    if candidate.cases:
        shown = candidate.cases[:max_cases]
        out.append(
            f"<h2>Generation cases ({len(shown)} of {len(candidate.cases)})</h2><table><tr><th>case</th><th>prompt</th><th>expected</th><th>candidate</th>"
        )
        ref_cases = {alias: {c.id: c for c in r.cases} for alias, r in refs.items()}
        for alias in refs:
            out.append(f"<th>{_e(refs[alias].label)}</th>")
        out.append("</tr>")
        for case in shown:
            out.append(
                f"<tr><td>{_e(case.id)}</td><td><pre>{_e(case.prompt)}</pre></td><td><pre>{_e(' | '.join(case.expected))}</pre></td>"
                f"<td><pre>{_e(case.output)}</pre>{_scores(case)}</td>"
            )
            for alias in refs:
                ref_case = ref_cases[alias].get(case.id)
                out.append(
                    f"<td><pre>{_e(ref_case.output)}</pre>{_scores(ref_case)}</td>" if ref_case else "<td>—</td>"
                )
            out.append("</tr>")
        out.append("</table>")
    if judge is not None:
        out.append(_judge_section(judge, max_cases))
    out.append(
        f"<p class='muted'>eval set digest {_e(candidate.eval_digest)} · candidate {_e(candidate.model_digest)}</p></body></html>"
    )
    return "".join(out)


def _scores(case: CaseResult) -> str:
    return "<div class='muted'>" + ", ".join(f"{_e(k)} {_num(v)}" for k, v in case.scores.items()) + "</div>"


_OUTCOME_CLASS = {"win": "pass", "loss": "fail", "tie": "skip"}


def _judge_section(judge: JudgeResult, max_cases: int) -> str:
    """Every judged case: the candidate's scores and reason, and the pairwise outcome with both orders' reasons."""
    shown = judge.cases[:max_cases]
    vs = judge.compare_to or "—"
    out = [
        f"<h2>LLM judge ({len(shown)} of {len(judge.cases)} cases)</h2>"
        f"<p class='muted'>judge <code>{_e(judge.model)}</code> · modes {_e(', '.join(judge.modes))} · "
        f"{judge.calls} calls, {judge.parse_failures} unparseable verdicts, {judge.request_failures} failed requests · "
        "scores 1–10 per criterion; pairwise: asked with the candidate as A and as B, a win or loss only when both "
        "orders agree</p>",
        "<table><tr><th>case</th><th>question</th><th>candidate</th><th>scores</th>"
        f"<th>vs {_e(vs)}</th><th>reasons</th></tr>",
    ]
    for c in shown:
        scores = ", ".join(f"{_e(k)} {v}" for k, v in c.scores.items()) if c.scores else "—"
        outcome = (
            f"<span class='{_OUTCOME_CLASS[c.outcome]}'>{c.outcome.upper()}</span>" if c.outcome is not None else "—"
        )
        reasons = [f"<div>score: {_e(c.score_reason)}</div>"] if c.scores else []
        reasons += [f"<div>{_e(o['order'])}: {_e(o['winner'])} — {_e(o['reason'])}</div>" for o in c.orders]
        reasons += [f"<div class='fail'>{_e(f)}</div>" for f in c.failures]
        out.append(
            f"<tr><td>{_e(c.id)}</td><td><pre>{_e(c.question)}</pre></td><td><pre>{_e(c.answer)}</pre></td>"
            f"<td>{scores}</td><td>{outcome}</td><td>{''.join(reasons)}</td></tr>"
        )
    out.append("</table>")
    return "".join(out)
