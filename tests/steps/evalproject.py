"""A small project for the evaluate/register step tests: a real prepare step, a `python` step that builds a
tiny model (seeded, so its digest changes with the seed), evaluate and register."""

from __future__ import annotations

import json
import random
import shutil
import textwrap
from pathlib import Path

HERE = Path(__file__).parent

STEPS_PY = """
from evaltiny import save_tiny

def build(ctx):
    save_tiny(ctx.output_path("model"), **ctx.config.params)
    return {"seed": ctx.config.params["seed"]}
"""

SENTENCES = [
    "서울은 대한민국의 수도입니다",
    "오늘은 날씨가 맑고 따뜻합니다",
    "한국어 언어 모델을 평가합니다",
    "도서관에서 책을 빌려 읽었습니다",
    "아침마다 공원에서 산책을 합니다",
    "시장에서 신선한 과일을 샀습니다",
]


def make_project(
    root: Path,
    *,
    gate: list[str],
    seed: int = 0,
    uri: str | None = None,
    register: bool = True,
    tiny: dict | None = None,
    judge: str | None = None,
) -> Path:
    """`tiny`: more arguments of save_tiny (context, init_range); `judge`: the evaluate step's judge block (YAML)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    rng = random.Random(0)
    docs = [" ".join(rng.sample(SENTENCES, 3)) + f" 문서 번호 {i}번입니다." for i in range(60)]
    (root / "data" / "corpus.txt").write_text("\n\n".join(docs), encoding="utf-8")
    suite = [
        {"prompt": "대한민국의 수도는?", "expected": "서울", "metric": "contains"},
        {"prompt": "날씨는 어떤가요?", "expected": "맑고 따뜻합니다", "metric": ["chrf", "exact"]},
        {
            "prompt": [{"role": "user", "content": "숫자를 말해 주세요"}],
            "expected": r"\\d",
            "metric": "regex",
            "id": "digit",
        },
    ]
    (root / "data" / "suite.jsonl").write_text(
        "\n".join(json.dumps(c, ensure_ascii=False) for c in suite), encoding="utf-8"
    )
    shutil.copy(HERE.parent / "tiny.py", root / "evaltiny.py")  # the project imports it from its own folder
    (root / "tinysteps.py").write_text(STEPS_PY, encoding="utf-8")
    tracking = f"tracking: {{uri: '{uri}'}}\n" if uri else ""
    gate_yaml = "[" + ", ".join(json.dumps(g) for g in gate) + "]"
    register_yaml = "  - kind: register\n" if register else ""
    (root / "kollm.yaml").write_text(
        textwrap.dedent(
            f"""\
            project: evaltest
            TRACKING
            data:
              corpus: {{path: data/corpus.txt}}
              suite: {{path: data/suite.jsonl}}
            steps:
              - kind: prepare
                name: prep
                inputs: {{source: corpus}}
                config: {{dataset: corpus, txt_mode: paragraph, split: {{eval_fraction: 0.25}}, filters: {{min_chars: 5}}}}
              - kind: python
                name: build
                config: {{callable: "tinysteps:build", outputs: {{model: model}}, params: {{seed: {seed}CONTEXT}}}}
              - kind: evaluate
                inputs: {{suite: suite}}
                config:
                  generation: {{max_new_tokens: 4}}
                  JUDGE
                  gate: {gate_yaml}
            """
        )
        .replace("TRACKING\n", tracking)
        .replace("CONTEXT", "".join(f", {k}: {v}" for k, v in (tiny or {}).items()))
        .replace("      JUDGE\n", f"      judge: {judge}\n" if judge else "")
        + register_yaml,
        encoding="utf-8",
    )
    return root
