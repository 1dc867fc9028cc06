"""The prepare step through the real runner: outputs, counts per reason, the validation gate, MLflow inputs."""

from __future__ import annotations

import json
import random
import textwrap
import uuid
from pathlib import Path

import pandas as pd
import pytest

import kollm
from kollm.data.dedup import canonical
from kollm.data.synthetic import corpus_with_near_duplicates
from kollm.errors import ConfigError, StepFailed
from kollm.steps.prepare import Config, prepare_batches


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _corpus_project(root: Path, *, gate: str = "{}", extra_steps: str = "", num_proc: int = 1) -> Path:
    """Two sources (a txt folder and a jsonl file) with planted duplicates, PII, junk and broken rows."""
    texts, origin = corpus_with_near_duplicates(160, dup_fraction=0.2, seed=11)
    (root / "data" / "txt").mkdir(parents=True)
    for i, t in enumerate(texts[:80]):
        (root / "data" / "txt" / f"doc{i:03d}.txt").write_text(t, encoding="utf-8")
    rows = [{"text": t} for t in texts[80:]]
    rows += [
        {"text": texts[0]},
        {
            "text": "연락처는 010-2345-6789이고 메일은 kim@example.com입니다. 회의는 다음 주 화요일 오후 세 시에 본관 대회의실에서 열리며 모든 팀원이 참석해야 합니다."
        },
    ]  # a copy; PII
    rows += [{"text": "짧다"}, {"text": "This line is English only and has no Korean at all, so it fails the ratio."}]
    rows += [{"body": "잘못된 열"}]
    (root / "data" / "rows.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) + "{not json\n", encoding="utf-8"
    )
    module = f"after_{uuid.uuid4().hex[:8]}"
    (root / f"{module}.py").write_text(
        "def touch(ctx):\n    (ctx.project_dir / 'downstream-ran').write_text('yes')\n"
        "    (ctx.output_path('m') / 'ok.txt').write_text('ok')\n    return {}\n",
        encoding="utf-8",
    )
    (root / "kollm.yaml").write_text(
        textwrap.dedent(
            f"""\
            project: prep-test
            data:
              docs: {{path: data/txt}}
              rows: {{path: data/rows.jsonl}}
            steps:
              - kind: prepare
                name: prep
                inputs: {{docs: docs, rows: rows}}
                config:
                  dataset: corpus
                  sources: [docs, rows]
                  num_proc: {num_proc}
                  batch_rows: 25
                  split: {{eval_fraction: 0.2}}
                  dedup: {{threshold: 0.7}}
                  gate: {gate}
              - kind: python
                name: after
                inputs: {{data: prep.dataset}}
                config: {{callable: "{module}:touch", inputs: {{data: corpus}}, outputs: {{m: metrics}}}}
            {extra_steps}"""
        ),
        encoding="utf-8",
    )
    return root


def _client(root: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{root / '.kollm' / 'mlflow.db'}")


@pytest.mark.slow(reason="a pipeline run through the runner")
def test_prepare_corpus_through_the_runner(tmp_path):
    root = _corpus_project(tmp_path, num_proc=2)  # worker processes forked from the runner
    result = kollm.run(root)
    rec = result.steps["prep"]
    ds = rec.outputs["dataset"]
    assert ds.type == "corpus"
    train = pd.read_parquet(ds.path / "train.parquet")
    eval_ = pd.read_parquet(ds.path / "eval.parquet")
    stats = json.loads((ds.path / "stats.json").read_text())
    assert list(train.columns) == ["text"] and list(eval_.columns) == ["text"]
    assert len(train) > 50 and len(eval_) > 5
    # counts per reason, in the stats, the artifact meta and MLflow metrics
    reasons = stats["rejected_by_reason"]
    assert reasons["read:invalid_json"] == 1 and reasons["schema:missing_text"] == 1
    assert reasons["filter:too_short"] == 1 and reasons["filter:low_hangul_ratio"] == 1
    assert reasons["dedup:exact"] >= 1 and reasons["dedup:near"] >= 10
    assert ds.meta["rejected_by_reason"] == reasons and ds.meta["train_rows"] == len(train)
    assert stats["rows_read"] == len(train) + len(eval_) + sum(reasons.values())
    assert rec.metrics["rejected.schema.missing_text"] == 1
    # PII masked in the output
    all_text = "\n".join(pd.concat([train, eval_])["text"])
    assert "010-2345-6789" not in all_text and "<PHONE>" in all_text and "<EMAIL>" in all_text
    # no eval row has a near-duplicate (or exact duplicate) in train
    train_keys = {canonical(t) for t in train["text"]}
    assert not any(canonical(t) in train_keys for t in eval_["text"])
    # the report
    report = rec.outputs["report"].path / "report.html"
    html = report.read_text(encoding="utf-8")
    assert "dedup:near" in html and "read:invalid_json" in html and "Hangul ratio" in html
    assert "http://" not in html and "https://" not in html  # no external assets
    # MLflow: dataset inputs with digests (sources, train, eval), stats logged
    run = _client(root).get_run(rec.run_id)
    inputs = {(d.dataset.name, d.tags[0].value): d.dataset.digest for d in run.inputs.dataset_inputs}
    assert {ctx for _, ctx in inputs} == {"source", "train", "eval"}
    assert ("prep/train", "train") in inputs and all(inputs.values())
    assert run.data.metrics["train_rows"] == len(train)
    # the downstream step ran on it
    assert (root / "downstream-ran").exists()


@pytest.mark.slow(reason="a pipeline run through the runner")
def test_gate_failure_stops_the_pipeline_with_a_summary(tmp_path):
    root = _corpus_project(tmp_path, gate="{max_rejected_fraction: 0.05, min_eval_rows: 1000}")
    with pytest.raises(StepFailed) as err:
        kollm.run(root)
    msg = str(err.value)
    assert "validation gate failed" in msg
    assert "config.gate.max_rejected_fraction" in msg and "config.gate.min_eval_rows" in msg
    assert "dedup:near" in msg and "read:invalid_json" in msg
    assert len(msg.splitlines()) <= 25
    assert not (root / "downstream-ran").exists()
    assert not list((root / ".kollm" / "steps").glob("*/dataset")) if (root / ".kollm" / "steps").exists() else True
    report = next((root / ".kollm" / "logs" / "system").glob("prepare-prep-report.html"))
    assert "validation gate failed" in report.read_text(encoding="utf-8")


def _chat_project(root: Path) -> Path:
    rng = random.Random(0)
    sft = [
        {
            "messages": [
                {
                    "role": "user",
                    "content": f"{i}번째 질문입니다. 서울의 {rng.choice(['날씨', '인구', '역사'])}에 대해 알려 주세요.",
                },
                {
                    "role": "assistant",
                    "content": f"{i}번째 답변입니다. 서울은 대한민국의 수도이며 {i * 7}년의 역사를 생각해 볼 수 있습니다.",
                },
            ]
        }
        for i in range(60)
    ]
    sft += [
        {"instruction": "인사말을 써 주세요.", "output": "안녕하세요, 만나서 반갑습니다."},
        {"messages": [{"role": "user", "content": "답 없음"}]},
    ]
    prefs = [
        {
            "prompt": f"{i} 더하기 {i + 1}은 얼마인가요?",
            "chosen": f"{i} 더하기 {i + 1}의 답은 {2 * i + 1}입니다.",
            "rejected": "잘 모르겠어요.",
        }
        for i in range(10, 60)
    ]
    prefs += [{"prompt": "같은 답", "chosen": "네", "rejected": "네"}]
    (root / "data").mkdir(parents=True)
    _write_jsonl(root / "data" / "sft.jsonl", sft)
    pd.DataFrame(prefs).to_parquet(root / "data" / "prefs.parquet")
    (root / "kollm.yaml").write_text(
        textwrap.dedent("""\
        project: chat-test
        data:
          sft: {path: data/sft.jsonl}
          prefs: {path: data/prefs.parquet}
        steps:
          - kind: prepare
            name: prepare-sft
            inputs: {source: sft}
            config: {dataset: instructions, filters: {min_chars: 10}, split: {eval_fraction: 0.2}}
          - kind: prepare
            name: prepare-prefs
            inputs: {source: prefs}
            config: {dataset: preferences, filters: {min_chars: 10}, split: {eval_fraction: 0.2}}
        """),
        encoding="utf-8",
    )
    return root


@pytest.mark.slow(reason="a pipeline run through the runner")
def test_prepare_instructions_and_preferences(tmp_path):
    result = kollm.run(_chat_project(tmp_path))
    sft = result.steps["prepare-sft"].outputs["dataset"]
    assert sft.type == "instructions"
    train = pd.read_parquet(sft.path / "train.parquet")
    msgs = list(train["messages"][0])
    assert [m["role"] for m in msgs] == ["user", "assistant"]
    assert sft.meta["rejected_by_reason"] == {"schema:messages_no_assistant_reply": 1}
    assert sft.meta["rows"] == 61
    prefs = result.steps["prepare-prefs"].outputs["dataset"]
    assert prefs.type == "preferences"
    p = pd.concat([pd.read_parquet(prefs.path / "train.parquet"), pd.read_parquet(prefs.path / "eval.parquet")])
    assert list(p.columns) == ["prompt", "chosen", "rejected"]
    assert all(list(x)[-1]["role"] == "user" for x in p["prompt"])
    assert prefs.meta["rejected_by_reason"] == {"schema:chosen_equals_rejected": 1}
    import pyarrow.parquet as pq

    schema = pq.read_schema(prefs.path / "eval.parquet")
    assert str(schema.field("prompt").type) == "list<element: struct<role: string, content: string>>"


def test_config_errors_name_the_field(tmp_path):
    root = _chat_project(tmp_path)
    text = (
        (root / "kollm.yaml")
        .read_text()
        .replace("filters: {min_chars: 10}, split", "filters: {min_char: 10}, split", 1)
    )
    (root / "kollm.yaml").write_text(text)
    with pytest.raises(
        ConfigError, match=r"steps\[0\]\.config\.filters\.min_char: unknown key; did you mean 'min_chars'"
    ):
        kollm.load(root)


def test_split_and_output_are_deterministic_and_independent_of_num_proc():
    texts, _ = corpus_with_near_duplicates(300, dup_fraction=0.1, seed=5)
    batches = [pd.DataFrame({"text": texts[i : i + 50], "_source": f"f{i}"}) for i in range(0, 300, 50)]
    one = prepare_batches(batches, Config(batch_rows=40, split={"eval_fraction": 0.2}))
    two = prepare_batches(batches, Config(batch_rows=40, num_proc=2, split={"eval_fraction": 0.2}))
    assert one.train.equals(two.train) and one.eval.equals(two.eval)
    assert one.counts == two.counts
    assert 0.1 < len(one.eval) / (len(one.train) + len(one.eval)) < 0.3
    other_seed = prepare_batches(batches, Config(batch_rows=40, split={"eval_fraction": 0.2, "seed": 1}))
    assert set(other_seed.eval["text"]) != set(one.eval["text"])


def test_workers_reading_files_give_the_same_result(tmp_path):
    from kollm.data.readers import SourceFiles
    from kollm.steps.prepare import prepare_sources, write_parquet

    texts, _ = corpus_with_near_duplicates(200, dup_fraction=0.15, seed=8)
    files = []
    for i in range(0, 200, 20):
        f = tmp_path / f"part{i:03d}.jsonl"
        _write_jsonl(f, [{"text": t} for t in texts[i : i + 20]] + [{"text": texts[0]}])
        files.append(str(f))
    src = [SourceFiles("s", str(tmp_path), "auto", files)]
    one = prepare_sources(src, Config(num_proc=1, batch_rows=16))
    two = prepare_sources(src, Config(num_proc=2, batch_rows=16))
    assert one.train.equals(two.train) and one.eval.equals(two.eval) and one.counts == two.counts
    assert one.counts.reasons["dedup:exact"] >= 10 and one.counts.reasons["dedup:near"] >= 5
    assert one.stats == two.stats
    # byte-identical outputs, whatever the number of processes
    for name, prepared in (("one", one), ("two", two)):
        (tmp_path / name).mkdir()
        for split in ("train", "eval"):
            write_parquet(getattr(prepared, split), tmp_path / name / f"{split}.parquet", "corpus")
    for split in ("train", "eval"):
        assert (tmp_path / "one" / f"{split}.parquet").read_bytes() == (
            tmp_path / "two" / f"{split}.parquet"
        ).read_bytes()


def test_transform_batch_is_a_batch_function_independent_of_batch_boundaries():
    from kollm.steps.prepare import transform_batch

    texts, _ = corpus_with_near_duplicates(30, seed=9)
    texts[3] = "전화 010-1234-5678 로 연락하세요. " + texts[3]
    raw = pd.DataFrame({"text": texts})
    cfg = Config()
    whole = transform_batch(raw, cfg)
    parts = pd.concat(
        [
            transform_batch(raw.iloc[:13].reset_index(drop=True), cfg),
            transform_batch(raw.iloc[13:].reset_index(drop=True), cfg),
        ],
        ignore_index=True,
    )
    assert whole.drop(columns="_minhash").equals(parts.drop(columns="_minhash"))
    assert all((a == b).all() for a, b in zip(whole["_minhash"], parts["_minhash"]))
    assert whole["_pii_phone"].tolist()[3] == 1 and "<PHONE>" in whole["text"][3]
    assert list(raw["text"]) == texts  # the input batch is not modified


def test_without_near_dedup_eval_rows_that_near_duplicate_train_move_to_train():
    base = "오늘은 날씨가 정말 좋네요. 공원에 가서 산책을 하고, 친구들과 맛있는 점심을 먹었습니다. 내일도 맑았으면 좋겠어요."
    texts = [base + f" 추신{i}" + "." * (i % 3) for i in range(40)]
    cfg = Config(dedup={"near": False, "exact": True, "threshold": 0.7}, split={"eval_fraction": 0.3})
    out = prepare_batches([pd.DataFrame({"text": texts})], cfg)
    assert len(out.eval) == 0 and len(out.train) == 40
    assert out.stats["eval_moved_to_train"] > 0


@pytest.mark.slow(reason="a pipeline run through the runner")
def test_fsspec_url_source_through_the_runner(tmp_path):
    import fsspec

    texts, _ = corpus_with_near_duplicates(40, seed=12)
    url = f"memory://kollm-{uuid.uuid4().hex[:8]}/rows.jsonl"
    with fsspec.open(url, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    (tmp_path / "kollm.yaml").write_text(
        textwrap.dedent(f"""\
        project: url-test
        data:
          web: {{path: "{url}"}}
        steps:
          - kind: prepare
            config: {{split: {{eval_fraction: 0.25}}}}
        """),
        encoding="utf-8",
    )
    ds = kollm.run(tmp_path).steps["prepare"].outputs["dataset"]
    assert ds.meta["rows_read"] == 40 and ds.meta["rows"] >= 35
    assert len(pd.read_parquet(ds.path / "eval.parquet")) > 0


def test_encoding_option_reads_cp949_files_in_both_reading_paths(tmp_path):
    from pydantic import ValidationError

    from kollm.data.readers import SourceFiles
    from kollm.steps.prepare import prepare_sources

    texts, _ = corpus_with_near_duplicates(40, seed=13)
    files = []
    for i in range(0, 40, 10):
        f = tmp_path / f"euckr{i:02d}.jsonl"
        f.write_bytes(
            "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts[i : i + 10]).encode("cp949")
        )
        files.append(str(f))
    src = [SourceFiles("old", str(tmp_path), "auto", files)]
    with pytest.raises(StepFailed, match="euckr00.jsonl is not valid utf-8"):
        prepare_sources(src, Config())
    for num_proc in (1, 2):  # 2: each worker reads its own files
        out = prepare_sources(src, Config(encoding="cp949", num_proc=num_proc, batch_rows=7))
        assert out.counts.total == 40 and "filter:low_hangul_ratio" not in out.counts.reasons
        assert set(out.train["text"]) | set(out.eval["text"]) <= set(texts)
    with pytest.raises(ValidationError, match="not ASCII-compatible"):
        Config(encoding="utf-16")
    with pytest.raises(ValidationError, match="unknown encoding"):
        Config(encoding="klingon")


def test_one_large_jsonl_file_is_read_in_byte_ranges_by_the_workers(tmp_path, monkeypatch):
    import kollm.steps.prepare as prepare
    from kollm.data.readers import SourceFiles
    from kollm.steps.prepare import file_tasks, prepare_sources, write_parquet

    texts, _ = corpus_with_near_duplicates(150, dup_fraction=0.15, seed=14)
    f = tmp_path / "all.jsonl"
    _write_jsonl(f, [{"text": t} for t in texts] + [{"text": texts[3]}])
    src = [SourceFiles("s", str(f), "auto", [str(f)])]
    monkeypatch.setattr(prepare, "MIN_PIECE_BYTES", f.stat().st_size // 9)
    assert len(file_tasks(src, Config(num_proc=2))) >= 9
    one = prepare_sources(src, Config(num_proc=1, batch_rows=16))
    two = prepare_sources(src, Config(num_proc=2, batch_rows=16))
    assert one.counts == two.counts and one.stats == two.stats and one.counts.total == 151
    assert one.counts.reasons["dedup:exact"] == 1 and one.counts.reasons["dedup:near"] >= 5
    for name, prepared in (("one", one), ("two", two)):
        (tmp_path / name).mkdir()
        write_parquet(prepared.train, tmp_path / name / "train.parquet", "corpus")
    assert (tmp_path / "one" / "train.parquet").read_bytes() == (tmp_path / "two" / "train.parquet").read_bytes()
