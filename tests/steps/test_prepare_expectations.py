"""`prepare` with `expectations: suite.json`: a Great Expectations 1.x suite checked by GX's own engine on the
prepared train and eval splits; a failed expectation fails the gate and the report shows GX's result."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

import kollm
from kollm.errors import ConfigError, StepFailed

pytest.importorskip("great_expectations", reason="great_expectations is not installed (pip install 'kollm[gx]')")


def suite(max_len: int) -> dict:
    return {
        "name": "korean-corpus",
        "expectations": [
            {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "text"}},
            {"type": "expect_column_value_lengths_to_be_between", "kwargs": {"column": "text", "max_value": max_len}},
            {"type": "expect_table_row_count_to_be_between", "kwargs": {"min_value": 1}},
        ],
        "meta": {},
    }


def project(root: Path, max_len: int) -> Path:
    from kollm.data.synthetic import corpus_with_near_duplicates

    docs, _ = corpus_with_near_duplicates(60, dup_fraction=0.0, seed=3)
    (root / "data").mkdir(parents=True)
    (root / "data" / "corpus.jsonl").write_text(
        "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8"
    )
    (root / "suite.json").write_text(json.dumps(suite(max_len)), encoding="utf-8")
    (root / "kollm.yaml").write_text(
        textwrap.dedent("""\
        project: gx-test
        data:
          corpus: {path: data/corpus.jsonl}
        steps:
          - kind: prepare
            inputs: {source: corpus}
            config: {expectations: suite.json, split: {eval_fraction: 0.2}}
        """),
        encoding="utf-8",
    )
    return root


def test_a_passing_suite_is_in_the_report_and_a_failing_one_fails_the_gate(tmp_path):
    p = project(tmp_path / "p", max_len=100_000)
    result = kollm.run(p)
    report = result.steps["prepare"].outputs["report"].path
    gx = json.loads((report / "expectations.json").read_text(encoding="utf-8"))
    assert set(gx) == {"train", "eval"} and all(r["success"] for r in gx.values())
    assert [x["expectation_config"]["type"] for x in gx["train"]["results"]] == [
        e["type"] for e in suite(1)["expectations"]
    ]
    assert "Great Expectations" in (report / "report.html").read_text(encoding="utf-8")

    (p / "suite.json").write_text(json.dumps(suite(max_len=50)), encoding="utf-8")  # an edited suite: not cached
    with pytest.raises(StepFailed) as e:
        kollm.run(p)
    msg = str(e.value)
    assert "config.expectations (train): expect_column_value_lengths_to_be_between(column='text', max_value=50)" in msg
    assert "unexpected of" in msg
    failed = p / ".kollm" / "logs" / "system"
    gx = json.loads((failed / "prepare-prepare-expectations.json").read_text(encoding="utf-8"))
    assert gx["train"]["success"] is False and gx["train"]["results"][1]["result"]["unexpected_count"] > 0
    html = (failed / "prepare-prepare-report.html").read_text(encoding="utf-8")
    assert "The validation gate failed" in html and "expect_column_value_lengths_to_be_between" in html


def test_a_suite_gx_cannot_read_is_one_config_error(tmp_path):
    p = project(tmp_path / "p", max_len=10)
    (p / "suite.json").write_text(
        json.dumps({"name": "x", "expectations": [{"type": "expect_column_to_be_korean", "kwargs": {}}]}),
        encoding="utf-8",
    )
    with pytest.raises(
        ConfigError,
        match=r"steps\.prepare\.config\.expectations: .*expectations\[0\] \(expect_column_to_be_korean\): GX cannot",
    ):
        kollm.run(p)
    (p / "suite.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="is not a JSON expectation suite"):
        kollm.run(p)


def test_the_readmes_suite_runs_through_gx(tmp_path):
    import pandas as pd

    from kollm.data.expectations import validate_splits

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    block = readme.split("```json\n", 1)[1].split("```", 1)[0]
    assert json.loads(block)["name"] == "korean-corpus"
    f = tmp_path / "suite.json"
    f.write_text(block, encoding="utf-8")
    ok, bad = validate_splits(
        f, {"train": pd.DataFrame({"text": ["안녕하세요"]}), "eval": pd.DataFrame({"text": [None]})}, "x"
    )
    assert ok.success and not bad.success
    assert bad.failed()[0]["expectation_config"]["type"] == "expect_column_values_to_not_be_null"
