"""lm-eval for real: kollm's Korean multiple-choice task (ko_quickstart_mc, local JSON data) runs through
lm-eval's Hugging Face backend on the step's tiny model; its scores land in metrics.json, gate rules use them,
the report shows them and the registered version carries them as tags."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'kollm[eval]')")

import kollm  # noqa: E402
from kollm import registry  # noqa: E402
from kollm.errors import ConfigError, GateFailed  # noqa: E402
from kollm.eval.harness import KOLLM_TASKS, LmEvalConfig, check_tasks, task_manager  # noqa: E402
from tests.steps.evalproject import make_project  # noqa: E402

LM_EVAL = "      lm_eval: {tasks: [ko_quickstart_mc], limit: 8, batch_size: 8}\n"


def _with_lm_eval(project):
    path = project / "kollm.yaml"
    text = path.read_text(encoding="utf-8")
    path.write_text(
        text.replace("      generation: {max_new_tokens: 4}\n", "      generation: {max_new_tokens: 4}\n" + LM_EVAL),
        encoding="utf-8",
    )
    return project


def test_shipped_task_data_is_what_build_writes():
    from kollm.eval.tasks.ko_quickstart_mc import build

    shipped = (KOLLM_TASKS / "ko_quickstart_mc" / "ko_quickstart_mc.json").read_text(encoding="utf-8")
    assert shipped == build.text()
    rows = json.loads(shipped)
    assert len(rows) > 80 and {r["kind"] for r in rows} == {"capital", "province", "antonym", "english"}
    assert all(len(r["choices"]) == 4 and len(set(r["choices"])) == 4 and 0 <= r["answer"] < 4 for r in rows)
    seoul = next(r for r in rows if r["question"] == "대한민국의 수도는 어디인가요?")
    assert seoul["choices"][seoul["answer"]] == "서울"


def test_unknown_task_names_are_config_errors_with_suggestions(tmp_path):
    cfg = LmEvalConfig(tasks=["ko_quickstart_mcq"])
    with pytest.raises(
        ConfigError, match=r"lm_eval\.tasks\[0\]: unknown task 'ko_quickstart_mcq'; did you mean 'ko_quickstart_mc'"
    ):
        check_tasks(cfg, task_manager(LmEvalConfig(tasks=["ko_quickstart_mc"]), tmp_path))
    with pytest.raises(ConfigError, match=r"lm_eval\.include_path: no folder"):
        task_manager(LmEvalConfig(tasks=["x"], include_path="missing"), tmp_path)


@pytest.mark.slow(reason="lm-eval tasks through a pipeline's evaluate and register")
def test_ko_quickstart_mc_end_to_end_metrics_gate_report_and_registry_tags(tmp_path):
    project = _with_lm_eval(make_project(tmp_path / "p", gate=["ko_quickstart_mc.acc >= 0", "perplexity <= 100000"]))
    result = kollm.run(project)
    doc = json.loads((result.steps["evaluate"].outputs["metrics"].path / "metrics.json").read_text())
    m = doc["metrics"]
    assert 0 <= m["ko_quickstart_mc.acc"] <= 1 and 0 <= m["ko_quickstart_mc.acc_norm"] <= 1
    assert m["ko_quickstart_mc.acc"] * 8 == round(m["ko_quickstart_mc.acc"] * 8)  # limit: 8 questions
    assert "ko_quickstart_mc.acc_stderr" not in m and "contains" in m and "perplexity" in m
    assert doc["gate"]["passed"] is True and "PASS: ko_quickstart_mc.acc = " in "\n".join(doc["gate"]["reasons"])
    html = (result.steps["evaluate"].outputs["report"].path / "report.html").read_text(encoding="utf-8")
    assert "ko_quickstart_mc.acc" in html and "ko_quickstart_mc.acc_norm" in html
    version = registry.show("evaltest", "challenger", project)
    assert float(version.tags["kollm.metric.ko_quickstart_mc.acc"]) == pytest.approx(
        m["ko_quickstart_mc.acc"], abs=1e-5
    )

    # a rule the score cannot meet fails the gate, naming the lm-eval metric (the evaluation itself is cached)
    text = (
        (project / "kollm.yaml")
        .read_text(encoding="utf-8")
        .replace('"ko_quickstart_mc.acc >= 0"', '"ko_quickstart_mc.acc >= 1.01"')
    )
    (project / "kollm.yaml").write_text(text, encoding="utf-8")
    with pytest.raises(GateFailed, match=r"FAIL.*ko_quickstart_mc\.acc"):
        kollm.run(project)


def test_include_path_task_over_local_json_files(tmp_path):
    """How the README points lm-eval at local copies: a task YAML in `include_path` whose dataset is local files
    (datasets' json loader), run on a tiny model through the hf backend."""
    import shutil

    from kollm.eval.harness import run_lm_eval
    from tests.tiny import tiny_model, tiny_tokenizer

    model = tmp_path / "model"
    tok = tiny_tokenizer()
    tiny_model(tok).save_pretrained(model)
    tok.save_pretrained(model)
    data = tmp_path / "copies" / "quiz.json"
    data.parent.mkdir()
    shutil.copyfile(KOLLM_TASKS / "ko_quickstart_mc" / "ko_quickstart_mc.json", data)
    tasks = tmp_path / "project" / "tasks"
    tasks.mkdir(parents=True)
    (tasks / "local_quiz.yaml").write_text(
        "task: local_quiz\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: multiple_choice\ntest_split: test\n"
        'doc_to_text: "질문: {{question}}\\n답:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n",
        encoding="utf-8",
    )
    scores = run_lm_eval(
        model, LmEvalConfig(tasks=["local_quiz"], limit=4, include_path="tasks"), tmp_path / "project", "cpu"
    )
    assert set(scores) == {"local_quiz.acc"} and scores["local_quiz.acc"] in (0, 0.25, 0.5, 0.75, 1)
