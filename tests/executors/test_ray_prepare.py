"""`prepare` on Ray Data gives exactly the local result: the same rows kept and rejected (with the same
reasons), the same train/eval split, the same stats and the same Parquet bytes, over several sources with
planted exact and near duplicates, broken rows and PII."""

from __future__ import annotations

import json
import random
from hashlib import sha256
from pathlib import Path

import pandas as pd
import pytest

from kollm.data.readers import SourceFiles
from kollm.data.synthetic import corpus_with_near_duplicates
from kollm.errors import StepFailed
from kollm.steps.prepare import Config, Prepared, prepare_sources, ray_tasks, write_parquet

pytestmark = pytest.mark.timeout(300)


def _corpus_sources(root: Path) -> list[SourceFiles]:
    """A txt folder (a document per file) and two JSON Lines files: ~300 rows, with copies across sources."""
    texts, origin = corpus_with_near_duplicates(300, dup_fraction=0.25, sentences=(2, 6), seed=5)
    assert sum(o >= 0 for o in origin) > 40  # planted near-duplicates
    txt = root / "txt"
    txt.mkdir(parents=True)
    for i, t in enumerate(texts[:60]):
        (txt / f"doc{i:03d}.txt").write_text(t, encoding="utf-8")
    rows = [{"text": t} for t in texts[60:]]
    rows += [{"text": texts[3]}, {"text": texts[70]}]  # exact copies of rows of both sources
    rows += [
        {
            "text": "연락처는 010-2345-6789이고 메일은 kim@example.com입니다. 회의는 다음 주 화요일 오후 세 시에 열립니다."
        }
    ]
    rows += [
        {"text": "짧다"},
        {"text": "English only, no Korean at all, so it fails the Hangul ratio filter."},
        {"body": "잘못된 열"},
    ]
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    (root / "a.jsonl").write_text("\n".join(lines[:130]) + "\n{not json\n", encoding="utf-8")
    (root / "b.jsonl").write_text("\n".join(lines[130:]) + "\n", encoding="utf-8")
    return [
        SourceFiles("docs", str(txt), "auto", sorted(str(p) for p in txt.glob("*.txt"))),
        SourceFiles("rows", str(root / "*.jsonl"), "auto", [str(root / "a.jsonl"), str(root / "b.jsonl")]),
    ]


def _written(prepared: Prepared, folder: Path, kind: str) -> dict[str, str]:
    folder.mkdir(parents=True)
    digests = {}
    for split, frame in (("train", prepared.train), ("eval", prepared.eval)):
        write_parquet(frame, folder / f"{split}.parquet", kind)
        digests[split] = sha256((folder / f"{split}.parquet").read_bytes()).hexdigest()
    return digests


def _assert_same(local: Prepared, on_ray: Prepared, tmp_path: Path, kind: str) -> None:
    pd.testing.assert_frame_equal(local.train, on_ray.train)
    pd.testing.assert_frame_equal(local.eval, on_ray.eval)
    assert local.counts == on_ray.counts
    assert local.stats == on_ray.stats
    assert local.report.examples == on_ray.report.examples
    assert _written(local, tmp_path / "local", kind) == _written(on_ray, tmp_path / "ray", kind)


def test_ray_data_prepare_matches_local_corpus(ray_cluster, tmp_path):
    sources = _corpus_sources(tmp_path / "data")
    cfg = Config(
        dataset="corpus",
        sources=["docs", "rows"],
        batch_rows=16,
        num_proc=2,
        split={"eval_fraction": 0.2},
        dedup={"threshold": 0.7},
    )
    assert len(ray_tasks(sources, cfg)) == 62  # 60 txt files and 2 JSON Lines files: one Ray Data row each
    seen: list = []
    on_ray = prepare_sources(sources, cfg, executor="ray", progress=lambda it, **kw: (seen.append(x) or x for x in it))
    local = prepare_sources(sources, cfg.model_copy(update={"num_proc": 1}))
    assert len(seen) >= 1  # the progress callback saw the stream of results
    reasons = on_ray.counts.reasons
    assert reasons["dedup:exact"] >= 2 and reasons["dedup:near"] >= 30
    assert reasons["read:invalid_json"] == 1 and reasons["schema:missing_text"] == 1
    assert reasons["filter:too_short"] == 1 and reasons["filter:low_hangul_ratio"] == 1
    assert on_ray.pii["phone"] == 1 and on_ray.counts.eval > 10
    _assert_same(local, on_ray, tmp_path, "corpus")
    # the local multi-process path agrees too
    _assert_same(prepare_sources(sources, cfg), on_ray, tmp_path / "procs", "corpus")


def test_ray_data_prepare_matches_local_instructions_without_near_dedup(ray_cluster, tmp_path):
    """Chat messages (nested columns) and the end-of-run split fix-up (near dedup off: eval rows that
    near-duplicate train rows move to train)."""
    rng = random.Random(3)
    rows = []
    for i in range(240):
        topic = rng.choice(["날씨", "인구", "역사", "음식"])
        q = f"{i % 150}번째 질문입니다. 서울의 {topic}에 대해 자세히 알려 주세요."
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": q},
                    {
                        "role": "assistant",
                        "content": f"{i}번째 답변입니다. 서울의 {topic}은 흥미로운 주제이며 많은 이야기가 있습니다.",
                    },
                ]
            }
        )
    rows.append({"instruction": "한국의 수도는?", "output": "서울입니다. 대한민국의 수도는 서울특별시입니다."})
    rows.append({"messages": "not a list"})
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    sources = [SourceFiles("source", str(path), "auto", [str(path)])]
    cfg = Config(
        dataset="instructions",
        batch_rows=32,
        num_proc=2,
        split={"eval_fraction": 0.3},
        dedup={"near": False},
        filters={"min_chars": 5},
    )
    on_ray = prepare_sources(sources, cfg, executor="ray")
    local = prepare_sources(sources, cfg.model_copy(update={"num_proc": 1}))
    assert on_ray.counts.train > 100 and on_ray.counts.eval >= 1 and on_ray.counts.rejected >= 1
    assert isinstance(on_ray.train["messages"][0], list)
    _assert_same(local, on_ray, tmp_path, "instructions")


def test_ray_data_prepare_reports_a_bad_file_like_local(ray_cluster, tmp_path):
    """An error in a Ray Data task (bytes that are not UTF-8) reaches the user as the same one message."""
    good = tmp_path / "good.jsonl"
    good.write_text(
        json.dumps({"text": "정상적인 한국어 문장입니다. 충분히 긴 문장이어야 필터를 통과합니다."}, ensure_ascii=False)
        + "\n",
        encoding="utf-8",
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes('{"text": "깨진 '.encode() + "문장".encode("cp949") + b'"}\n')
    sources = [SourceFiles("source", str(tmp_path / "*.jsonl"), "auto", [str(bad), str(good)])]
    cfg = Config(num_proc=2)
    with pytest.raises(StepFailed) as local:
        prepare_sources(sources, cfg.model_copy(update={"num_proc": 1}))
    with pytest.raises(StepFailed) as on_ray:
        prepare_sources(sources, cfg, executor="ray")
    assert str(on_ray.value) == str(local.value) and "bad.jsonl" in str(on_ray.value)
