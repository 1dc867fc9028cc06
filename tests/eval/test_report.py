"""The evaluation report: loss curves from MLflow history or training logs, tables, champion side by side."""

from __future__ import annotations

import json

import mlflow
from mlflow.entities import Metric

from kollm.eval.gate import decide, parse_rule
from kollm.eval.generation import CaseResult
from kollm.eval.report import ModelEval, curves_from_log, render, training_curves
from kollm.pipeline.step import StepRecord


def test_curves_from_mlflow_history_and_from_logs(tmp_path):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("x", artifact_location=(tmp_path / "a").as_uri())
    sft = client.create_run(exp).info.run_id
    client.log_batch(
        sft, metrics=[Metric("loss", 5.0 - i, 0, i) for i in range(4)] + [Metric("lr", 0.1, 0, i) for i in range(4)]
    )
    cached = client.create_run(exp).info.run_id  # a cached step's run holds only the final value
    client.log_batch(cached, metrics=[Metric("loss", 2.0, 0, 0)])
    logs = tmp_path / "logs"
    logs.mkdir()
    records = [{"step": s, "loss": 9.0 - s} for s in (1, 2, 3)] + [{"step": s, "loss": 4.0 - s / 10} for s in (1, 2)]
    (logs / "cpt.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\nnot json\n")
    upstream = [
        StepRecord("prep", "prepare", "k0", None, False, {}, {}),
        StepRecord("cpt", "cpt", "k1", cached, True, {}, {}),
        StepRecord("sft", "sft", "k2", sft, False, {}, {}),
    ]
    curves = training_curves(upstream, client, logs)
    assert [c.label for c in curves] == ["cpt: loss", "sft: loss"]
    assert curves[0].points == [(1.0, 3.9), (2.0, 3.8)]  # the last run in the log (it restarted at step 1)
    assert curves[1].points == [(0.0, 5.0), (1.0, 4.0), (2.0, 3.0), (3.0, 2.0)]
    assert curves_from_log("x", logs / "missing.jsonl") == []


def test_report_shows_gate_metrics_curves_and_champion(tmp_path):
    case = CaseResult("line 1", "수도는?", ["서울"], "서울입니다", {"contains": 1.0})
    candidate = ModelEval(
        "candidate", "sha256:aa", "ee", {"perplexity": 20.0, "contains": 1.0}, {"contains": 1}, [case]
    )
    champion = ModelEval(
        "champion (v3)",
        "sha256:bb",
        "ee",
        {"perplexity": 25.0, "contains": 0.5},
        {},
        [CaseResult("line 1", "수도는?", ["서울"], "부산 <b>", {"contains": 0.0})],
        version="3",
    )
    gate = decide([parse_rule("perplexity <= champion")], candidate.metrics, {"champion": champion.metrics})
    from kollm.eval.report import Curve

    html = render(
        title="t",
        subtitle="s",
        candidate=candidate,
        references={"champion": champion, "production": None},
        gate=gate,
        curves=[Curve("sft: loss", [(0, 5.0), (10, 2.0)])],
    )
    assert "Quality gate: PASSED" in html and "<polyline" in html and "sft: loss" in html
    assert "champion (v3)" in html and "Not registered yet (nothing to compare with): production" in html
    assert "<td class='num better'>-5</td>" in html  # perplexity went down: better
    assert "<td class='num better'>+0.5</td>" in html  # contains went up: better
    assert "부산 &lt;b&gt;" in html  # outputs are escaped
    roundtrip = ModelEval.from_json(json.loads(json.dumps(champion.to_json())))
    assert roundtrip == champion
