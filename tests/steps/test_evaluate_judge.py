"""The evaluate step's LLM judge with kollm serving a tiny model as the judge on CPU: under the JSON schema every
verdict parses, so these tests check the wiring (swap logic, aggregation, the gate, the report, MLflow), not the
judge's wisdom. Failure handling against a misbehaving endpoint: tests/eval/test_judge.py."""

from __future__ import annotations

import json

import pytest

from tests.steps.evalproject import make_project
from tests.tiny import save_tiny

import kollm
from kollm import registry
from kollm.errors import ConfigError, GateFailed
from kollm.eval.judge import DEFAULT_RUBRIC, Item, JudgeConfig, judge, pair_outcome

JUDGE_OPTIONS = "max_reason_chars: 40, max_tokens: 384, limit: 1"


@pytest.fixture(scope="module")
def judge_server(tmp_path_factory):
    """`kollm serve` of a tiny model with a long context (the judge prompts are ~1,500 tokens) on 127.0.0.1."""
    import torch

    from kollm.serve.local import local_server

    pytest.importorskip("xgrammar", reason="kollm serve constrains JSON with xgrammar: pip install 'kollm[json]'")

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = save_tiny(tmp_path_factory.mktemp("judge") / "model", init_range=0.5, context=4096)
    with local_server(str(folder), device="cpu", backend="transformers") as (url, name):
        yield url, name
    torch.set_num_threads(before)


def read_metrics(result) -> dict:
    return json.loads((result.steps["evaluate"].outputs["metrics"].path / "metrics.json").read_text())


def judge_table(client, run_id: str, tmp_path) -> list[dict]:
    path = client.download_artifacts(run_id, "evaluation/judge.json", str(tmp_path))
    doc = json.loads(open(path, encoding="utf-8").read())
    return [dict(zip(doc["columns"], row, strict=True)) for row in doc["data"]]


def assessments(client, run) -> dict[str, list]:
    traces = client.search_traces(
        locations=[run.info.experiment_id], filter_string=f"metadata.mlflow.sourceRun = '{run.info.run_id}'"
    )
    return {t.info.tags["kollm.case"]: t.info.assessments for t in traces}


def test_kollm_serve_as_the_judge_gives_parseable_verdicts_in_both_orders(judge_server):
    url, name = judge_server
    items = [
        Item("1", "대한민국의 수도는?", "서울입니다.", "부산입니다."),
        Item("2", "인사해 주세요", "안녕하세요!", "안녕"),
    ]
    cfg = JudgeConfig(model=name, base_url=url, max_reason_chars=40, max_tokens=384)
    result = judge(items, base_url=url, cfg=cfg, rubric=DEFAULT_RUBRIC, compare_to="champion")
    assert result.calls == 8 and result.parse_failures == 0 and result.request_failures == 0
    for case in result.cases:
        assert set(case.scores) == set(case.reference_scores) == {c.name for c in DEFAULT_RUBRIC.criteria}
        assert [o["order"] for o in case.orders] == ["candidate=A", "candidate=B"]
        assert case.outcome == pair_outcome(*(o["winner"] for o in case.orders))
    m = result.metrics()
    outcomes = [c.outcome for c in result.cases]
    assert m["judge_win_rate"] == (outcomes.count("win") + outcomes.count("tie") / 2) / 2
    assert m["judge_score"] == pytest.approx(sum(sum(c.scores.values()) / 4 for c in result.cases) / 2)


@pytest.mark.slow(
    reason="two pipeline runs (prepare, two builds, evaluate, register): ~150 s on a loaded 2-core machine"
)
def test_judge_scores_then_compares_with_the_champion(tmp_path, judge_server):
    url, name = judge_server
    gate = ["judge_score >= 1", "judge_win_rate >= 0.5", "judge_parse_failures <= 0"]
    judge = f'{{base_url: "{url}", model: {name}, {JUDGE_OPTIONS}}}'
    # varied greedy outputs (init_range 0.5): the two seeds answer differently, and the champion can judge
    project = make_project(tmp_path / "p", gate=gate, tiny={"context": 4096, "init_range": 0.5}, judge=judge)
    first = kollm.run(project)

    # no champion yet: scores only; the win-rate rule is skipped, as relative rules are
    doc = read_metrics(first)
    m = doc["metrics"]
    assert 1 <= m["judge_score"] <= 10 and 1 <= m["judge_score.fluency"] <= 10
    assert m["judge_parse_failures"] == 0 and m["judge_request_failures"] == 0 and "judge_win_rate" not in m
    assert doc["counts"]["judge_score"] == 1  # limit: 1 of the suite's 3 cases
    outcomes = {o["rule"]: o for o in doc["gate"]["outcomes"]}
    assert outcomes["judge_score >= 1"]["status"] == "pass"
    assert outcomes["judge_win_rate >= 0.5"]["status"] == "skip"
    assert "no 'champion' model registered yet to compare answers with" in outcomes["judge_win_rate >= 0.5"]["reason"]
    report = first.steps["evaluate"].outputs["report"].path
    cases = json.loads((report / "report.json").read_text())["judge"]["cases"]
    assert [c["id"] for c in cases] == ["line 1"] and cases[0]["question"] == "대한민국의 수도는?"
    assert all(set(c["scores"]) == {"helpfulness", "correctness", "harmlessness", "fluency"} for c in cases)
    html = (report / "report.html").read_text()
    assert "LLM judge (1 of 1 cases)" in html and "0 unparseable verdicts" in html
    assert cases[0]["score_reason"] and _escaped(cases[0]["score_reason"]) in html
    # MLflow: the verdict table and one trace per case with the scores as LLM-judge assessments
    client = registry.client(project)
    run = client.get_run(first.steps["evaluate"].run_id)
    assert run.data.metrics["judge_score"] == pytest.approx(m["judge_score"])
    rows = judge_table(client, run.info.run_id, tmp_path)
    assert [r["case"] for r in rows] == ["line 1"] and rows[0]["score_reason"] == cases[0]["score_reason"]
    found = assessments(client, run)
    assert set(found) == {"line 1"}
    scores = {a.name: a for a in found["line 1"]}
    assert {k: a.value for k, a in scores.items()} == cases[0]["scores"]
    assert (
        scores["fluency"].source.source_type == "LLM_JUDGE" and scores["fluency"].rationale == cases[0]["score_reason"]
    )

    # a champion, and a new candidate judged against it, both orders asked; here the champion itself is the judge,
    # served by kollm (models:/...) for the step; a rule the win rate cannot meet fails the gate
    registry.promote("evaltest", reason="baseline", project_dir=project)
    text = (project / "kollm.yaml").read_text().replace("seed: 0", "seed: 1")
    text = text.replace(judge, f'{{model: "models:/evaltest@champion", {JUDGE_OPTIONS}}}')
    (project / "kollm.yaml").write_text(text.replace(json.dumps(gate[1]), '"judge_win_rate > 1"'))
    with pytest.raises(GateFailed, match=r"FAIL  judge_win_rate > 1 +judge_win_rate = [\d.]+, needs > 1"):
        kollm.run(project)
    kept = (project / ".kollm" / "reports" / "evaluate-gate-failed.html").read_text()
    assert "vs champion" in kept and "candidate=A" in kept and "candidate=B" in kept
    failed = client.search_runs(
        [run.info.experiment_id], "tags.`kollm.step` = 'evaluate' and tags.`kollm.gate` = 'failed'"
    )[0]
    rows = judge_table(client, failed.info.run_id, tmp_path / "2")
    assert all(r["reference_answer"] is not None for r in rows)
    asked = [r for r in rows if r["winner_candidate_A"] is not None]  # identical answers are a tie without a call
    assert asked, "the two tiny models gave the same answers"
    for r in rows:
        assert r["outcome"] == (pair_outcome(r["winner_candidate_A"], r["winner_candidate_B"]) if r in asked else "tie")
    wins = sum(r["outcome"] == "win" for r in rows) + sum(r["outcome"] == "tie" for r in rows) / 2
    assert failed.data.metrics["judge_win_rate"] == pytest.approx(wins / len(rows))
    assert failed.data.metrics["champion.judge_score"] >= 1  # the champion's answers are scored too
    pairwise = {
        c: [a for a in found if a.name == "pairwise_vs_champion"] for c, found in assessments(client, failed).items()
    }
    assert {c: [a.value for a in v] for c, v in pairwise.items()} == {r["case"]: [r["outcome"]] for r in rows}


def _escaped(text: str) -> str:
    import html

    return html.escape(text)


def test_judge_settings_and_rubric_are_in_the_cache_key_and_checked(tmp_path):
    from kollm.pipeline.plan import plan, step_key

    rubric = tmp_path / "p" / "rubric.yaml"
    judge = '{base_url: "http://127.0.0.1:9/v1", model: j, rubric: rubric.yaml, modes: [pairwise]}'
    project = make_project(tmp_path / "p", gate=["judge_win_rate >= 0.5"], judge=judge, register=False)
    rubric.write_text("criteria: [{name: politeness, description: '공손함'}]\n", encoding="utf-8")
    first = plan(kollm.load(project))
    rubric.write_text("criteria: [{name: politeness, description: '공손함: 존댓말'}]\n", encoding="utf-8")
    second = plan(kollm.load(project))
    step = next(s for s in first.steps if s.name == "evaluate")
    assert first.references["evaluate"]["judge-rubric"] != second.references["evaluate"]["judge-rubric"]
    assert step_key(step, {}, first.references["evaluate"]) != step_key(step, {}, second.references["evaluate"])

    # a registered judge: the version its alias points at is a reference too (none registered here)
    text = (project / "kollm.yaml").read_text()
    (project / "kollm.yaml").write_text(
        text.replace('base_url: "http://127.0.0.1:9/v1", model: j', 'model: "models:/j@champion"')
    )
    assert plan(kollm.load(project)).references["evaluate"]["judge:models:/j@champion"] == "none"

    # the metrics a judge produces, for the gate's check before anything runs
    from kollm.steps.evaluate import _expected_metrics

    cfg = next(s for s in kollm.load(project).steps if s.name == "evaluate").config
    assert _expected_metrics(cfg, False, [], project) == {
        "judge_win_rate",
        "judge_parse_failures",
        "judge_request_failures",
    }
    scored = cfg.model_copy(update={"judge": cfg.judge.model_copy(update={"modes": ["score"]})})
    assert _expected_metrics(scored, False, [], project) >= {"judge_score", "judge_score.politeness"}
    text = (project / "kollm.yaml").read_text()
    (project / "kollm.yaml").write_text(text.replace("      generation: {max_new_tokens: 4}\n", ""))
    with pytest.raises(ConfigError, match="judge: needs `generation:`"):
        kollm.load(project)


def test_the_readme_judge_block_is_a_valid_judge_config():
    from pathlib import Path

    from kollm.steps.evaluate import Config

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    block = readme.split("### LLM judge (`judge:`)")[1].split("```yaml\n")[1].split("```")[0]
    import yaml

    config = Config.model_validate({"generation": {}, **yaml.safe_load(block)})
    assert config.judge is not None and config.judge.modes == ["score", "pairwise"] and config.judge.max_retries == 3
    assert config.gate == ["judge_win_rate >= 0.5", "judge_parse_failures <= 0"]
