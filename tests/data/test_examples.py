"""`kollm init`'s example: files copied and generated deterministically; its prepare steps pass their gates."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

import kollm
from kollm.data.readers import SourceFiles, read_source
from kollm.data.schema import to_schema_batch
from kollm.data.synthetic import has_batchim, josa, read_number
from kollm.errors import KollmError
from kollm.examples import init_project
from kollm.steps.prepare import prepare_batches


def test_init_project_generates_data_deterministically(tmp_path):
    a = init_project(tmp_path / "a")
    b = init_project(tmp_path / "b")
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    assert "kollm.yaml" in files and "data/instructions.jsonl" in files and "data/eval_suite.jsonl" in files
    assert (
        "data/corpus/kolaw-constitution.txt" in files and sum(f.startswith("data/corpus/kobill-") for f in files) == 10
    )
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    suite = [json.loads(line) for line in (a / "data" / "eval_suite.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(suite) >= 30 and all(set(c) == {"prompt", "expected", "metric"} for c in suite)
    assert {c["metric"] for c in suite} <= {"contains", "chrf", "regex"}
    assert {"prompt": "프랑스의 수도는 어디인가요?", "expected": "파리", "metric": "contains"} in suite


def test_init_project_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(KollmError, match="not empty"):
        init_project(tmp_path / "x")
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    assert (init_project(tmp_path / "empty") / "kollm.yaml").exists()
    with pytest.raises(KollmError, match="unknown example"):
        init_project(tmp_path / "y", "no-such-example")


def test_generated_rows_fit_their_schemas(tmp_path):
    root = init_project(tmp_path / "p")
    for name, kind, n in (("instructions", "instructions", 300), ("preferences", "preferences", 250)):
        df = pd.concat(read_source(SourceFiles(name, "", "jsonl", [str(root / "data" / f"{name}.jsonl")])))
        out = to_schema_batch(df, kind)
        assert (out["_reject"] == "").sum() >= n


def test_korean_particles_and_number_reading():
    assert josa("사과", "을/를") == "사과를" and josa("책", "을/를") == "책을" and josa("서울", "이/가") == "서울이"
    assert has_batchim("13") and not has_batchim("12")
    assert [read_number(n) for n in (0, 11, 100, 1234, 10000, 20305)] == [
        "영",
        "십일",
        "백",
        "천이백삼십사",
        "만",
        "이만삼백오",
    ]


def test_quickstart_prepare_steps_pass_their_gates(tmp_path):
    from kollm.data.validate import violations

    root = init_project(tmp_path / "qs")
    pipe = kollm.load(root)
    prepare_steps = [s for s in pipe.steps if s.kind == "prepare"]
    assert [s.name for s in prepare_steps] == ["prepare-corpus", "prepare-sft", "prepare-prefs"]
    for step in prepare_steps:
        src = pipe.cfg.data[step.inputs["source"].source]
        path = root / src.path
        files = sorted(str(p) for p in path.rglob("*.txt")) if path.is_dir() else [str(path)]
        out = prepare_batches(
            read_source(SourceFiles(step.name, str(path), src.format, files), step.config.txt_mode), step.config
        )
        assert not violations(out.counts, step.config.gate), (step.name, out.counts)
        assert out.counts.train >= 100 and out.counts.eval >= 10, (step.name, out.counts)


def test_init_into_an_existing_empty_folder_keeps_that_folder(tmp_path, monkeypatch):
    """`kollm init .` used to replace the current folder (rmdir + rename), leaving the shell in a deleted one."""
    import os

    here = tmp_path / "here"
    here.mkdir()
    inode = here.stat().st_ino
    monkeypatch.chdir(here)
    root = init_project(Path("."))
    assert root == here and here.stat().st_ino == inode
    assert Path(os.getcwd()).stat().st_ino == inode and Path("kollm.yaml").exists()
    assert (here / "data" / "corpus").is_dir() and (here / "data" / "instructions.jsonl").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["here"]  # the temporary folder is gone


def test_quickstart_gate_fails_a_broken_model_and_passes_the_demo_model(tmp_path):
    """The quickstart's gate on its own suite: answers of replacement characters (or nothing) fail; the demo model's
    kind of answer (Korean words, wrong facts: measured chrf 1.5-1.7 of 100, contains 0) passes."""
    import yaml

    from kollm.eval.gate import decide, parse_rule
    from kollm.eval.generation import load_suite, score

    root = init_project(tmp_path / "q")
    step = next(s for s in yaml.safe_load((root / "kollm.yaml").read_text())["steps"] if s["kind"] == "evaluate")
    rules = [parse_rule(r) for r in step["config"]["gate"]]
    cases = load_suite(root / "data" / "eval_suite.jsonl")
    prompts = [""] * len(cases)

    def verdict(output: str) -> bool:
        result = score(cases, prompts, [output] * len(cases), ["contains"])
        return decide(rules, {**result.metrics, "perplexity": 50.0}, {}).passed

    assert verdict("서울 64은 14은 14입니다.")  # what the demo model answers
    assert verdict("서울 64은 14은 14입니다\ufffd")  # the last character cut by max_new_tokens
    assert not verdict("\ufffd\ufffd \ufffd\ufffd\ufffd")
    assert not verdict("\ufffd\ufffd 국민은 \ufffd\ufffd \ufffd\ufffd의 \ufffd\ufffd을 가진다.")  # chrf 6 of 100
    assert not verdict("")
    assert not verdict("64 14 the answer is")
