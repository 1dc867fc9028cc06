"""The evaluate step through the runner: metrics, report, gate pass/fail, and the champion side by side."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from tests.steps.evalproject import make_project

import kollm
from kollm import registry
from kollm.errors import ConfigError, GateFailed


def read_metrics(result) -> dict:
    return json.loads((result.steps["evaluate"].outputs["metrics"].path / "metrics.json").read_text())


def test_metrics_report_and_passing_gate(tmp_path):
    project = make_project(tmp_path / "p", gate=["perplexity <= 100000", "contains >= 0"], register=False)
    result = kollm.run(project)
    doc = read_metrics(result)
    m = doc["metrics"]
    assert set(m) == {"perplexity", "nll", "eval_tokens", "contains", "chrf", "exact", "regex"}
    assert 1 < m["perplexity"] < 1000  # an untrained model over ~300 tokens is near-uniform
    assert doc["counts"]["contains"] == 1 and doc["counts"]["regex"] == 1 and doc["counts"]["perplexity"] > 5
    assert doc["gate"]["passed"] is True and len(doc["gate"]["outcomes"]) == 2
    assert doc["references"] == {"champion": None}
    html = (result.steps["evaluate"].outputs["report"].path / "report.html").read_text()
    assert "Quality gate: PASSED" in html and "perplexity" in html and "대한민국의 수도는?" in html
    # logged to MLflow: metrics, the decision, and the files
    run = registry.client(project).get_run(result.steps["evaluate"].run_id)
    assert run.data.metrics["perplexity"] == pytest.approx(m["perplexity"])
    assert run.data.metrics["gate_passed"] == 1.0 and run.data.tags["kollm.gate"] == "passed"
    assert "PASS: perplexity" in run.data.tags["kollm.gate.reasons"]
    # results are cached by model digest and eval-set digest
    cache = list((project / ".kollm" / "eval-cache").glob("*.json"))
    model_digest = result.steps["build"].outputs["model"].digest.removeprefix("sha256:")
    assert len(cache) == 1 and cache[0].name.startswith(model_digest[:24])


def test_failed_gate_stops_before_register_and_explains(tmp_path):
    project = make_project(tmp_path / "p", gate=["perplexity <= 2", "exact >= 0"])
    with pytest.raises(GateFailed) as e:
        kollm.run(project)
    text = str(e.value)
    assert e.value.exit_code == 3
    assert "quality gate of step 'evaluate' FAILED" in text
    assert "FAIL  perplexity <= 2" in text and "needs <= 2" in text and "PASS  exact >= 0" in text
    assert "nothing was registered" in text and len(text.splitlines()) < 25
    assert (project / ".kollm" / "reports" / "evaluate-gate-failed.html").is_file()
    c = registry.client(project)
    assert c.search_registered_models() == []  # register never ran
    failed = c.search_runs([c.get_experiment_by_name("evaltest").experiment_id], "tags.`kollm.step` = 'evaluate'")[0]
    assert failed.data.tags["kollm.gate"] == "failed" and failed.data.metrics["gate_passed"] == 0.0
    assert "FAIL: perplexity" in failed.data.tags["kollm.gate.reasons"]


def test_gate_on_a_metric_that_is_not_produced_is_a_config_error(tmp_path):
    project = make_project(tmp_path / "p", gate=["bleu >= 10"], register=False)
    with pytest.raises(ConfigError, match="gate\\[0\\]: 'bleu >= 10' uses metric 'bleu'.*it produces: chrf, contains"):
        kollm.run(project)


def test_bad_rule_and_missing_lm_eval_fail_validation(tmp_path):
    project = make_project(tmp_path / "p", gate=["perplexity is low"], register=False)
    with pytest.raises(ConfigError, match=r"steps\[2\]\.config\.gate\[0\]: cannot read gate rule"):
        kollm.load(project)
    text = (
        (project / "kollm.yaml").read_text().replace('gate: ["perplexity is low"]', "lm_eval: {tasks: [kobest_boolq]}")
    )
    (project / "kollm.yaml").write_text(text)
    if (
        importlib.util.find_spec("lm_eval") is not None
    ):  # installed (the dev extra): see tests/eval/test_lm_eval_tasks.py
        kollm.load(project)
        return
    with pytest.raises(
        ConfigError,
        match=r"config\.lm_eval\.tasks: lm-eval tasks are configured but lm-eval is not installed.*pip install lm-eval",
    ):
        kollm.load(project)


@pytest.mark.slow(reason="a pipeline run, then evaluate again against the promoted champion")
def test_relative_gate_compares_with_the_champion_on_the_same_eval_set(tmp_path):
    project = make_project(tmp_path / "p", gate=["perplexity <= 100000"], seed=0)
    first = kollm.run(project)
    champion_ppl = read_metrics(first)["metrics"]["perplexity"]
    registry.promote("evaltest", reason="baseline", project_dir=project)
    shutil.rmtree(project / ".kollm" / "eval-cache")  # the champion must be evaluated from the registry

    # a different candidate (another seed) must be at least 50 % better than the champion: it is not
    yaml = (project / "kollm.yaml").read_text()
    (project / "kollm.yaml").write_text(
        yaml.replace("seed: 0", "seed: 1").replace('["perplexity <= 100000"]', '["perplexity <= champion * 0.5"]')
    )
    with pytest.raises(GateFailed, match=r"FAIL  perplexity <= champion \* 0.5 .*champion = "):
        kollm.run(project)
    cached = {p.name.split("-")[0] for p in (project / ".kollm" / "eval-cache").glob("*.json")}
    champion_digest = first.steps["build"].outputs["model"].digest.removeprefix("sha256:")[:24]
    assert champion_digest in cached and len(cached) == 2  # candidate and champion, each cached

    # within 5 % of the champion passes; the report and metrics.json carry both side by side
    (project / "kollm.yaml").write_text(
        (project / "kollm.yaml").read_text().replace("champion * 0.5", "champion * 1.05")
    )
    second = kollm.run(project)
    doc = read_metrics(second)
    ref = doc["references"]["champion"]
    assert ref["version"] == "1" and ref["metrics"]["perplexity"] == pytest.approx(champion_ppl, rel=1e-6)
    assert doc["metrics"]["perplexity"] != pytest.approx(champion_ppl)
    assert doc["gate"]["outcomes"][0]["reference"] == pytest.approx(champion_ppl, rel=1e-6)
    html = (second.steps["evaluate"].outputs["report"].path / "report.html").read_text()
    assert "champion (v1)" in html and "&Delta; vs champion" in html
    assert registry.show("evaltest", "challenger", project).version == "2"
