"""The small project the UI tests look at: a real prepare step on Korean text, a tiny `cpt` (loss curves), a real
evaluate step (its report) and register, in the spirit of the Korean quickstart but a few seconds long."""

from __future__ import annotations

import json
import random
import textwrap
from pathlib import Path

SENTENCES = [
    "서울은 대한민국의 수도입니다",
    "오늘은 날씨가 맑고 따뜻합니다",
    "한국어 언어 모델을 평가합니다",
    "도서관에서 책을 빌려 읽었습니다",
    "아침마다 공원에서 산책을 합니다",
    "시장에서 신선한 과일을 샀습니다",
]

CPT = "{base_model: scratch, preset: tiny, vocab_size: 400, seq_len: 64, max_steps: 12, lr: 3.0e-3, batch_size: 4, log_every: 2, checkpoint_every: 6}"


def make_project(root: Path, *, uri: str | None = None) -> Path:
    """kollm.yaml with prepare -> cpt -> evaluate -> register, and its data files."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    rng = random.Random(0)
    docs = [" ".join(rng.sample(SENTENCES, 3)) + f" 문서 번호 {i}번입니다." for i in range(80)]
    (root / "data" / "corpus.txt").write_text("\n\n".join(docs), encoding="utf-8")
    suite = [
        {"prompt": "대한민국의 수도는?", "expected": "서울", "metric": "contains"},
        {"prompt": "날씨는 어떤가요?", "expected": "맑고 따뜻합니다", "metric": ["chrf", "exact"]},
    ]
    (root / "data" / "suite.jsonl").write_text(
        "\n".join(json.dumps(c, ensure_ascii=False) for c in suite), encoding="utf-8"
    )
    tracking = f"tracking: {{uri: '{uri}'}}\n" if uri else ""
    (root / "kollm.yaml").write_text(
        "project: ui-demo\n"
        + tracking
        + textwrap.dedent(
            f"""\
            data:
              corpus: {{path: data/corpus.txt}}
              suite: {{path: data/suite.jsonl}}
            steps:
              - kind: prepare
                name: prepare-corpus
                inputs: {{source: corpus}}
                config: {{dataset: corpus, txt_mode: paragraph, split: {{eval_fraction: 0.25}}, filters: {{min_chars: 5}}}}
              - kind: cpt
                config: {CPT}
              - kind: evaluate
                inputs: {{suite: suite}}
                config:
                  generation: {{max_new_tokens: 4}}
                  gate: ["perplexity <= 100000"]
              - kind: register
            """
        ),
        encoding="utf-8",
    )
    return root
