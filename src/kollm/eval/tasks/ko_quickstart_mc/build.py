"""Builds ko_quickstart_mc.json: four-way multiple-choice questions from the facts the korean-quickstart
example's instruction data is generated from (kollm.data.synthetic: capitals, provincial capitals, antonyms,
English words). Deterministic; tests/eval/test_lm_eval_tasks.py checks the shipped file equals its output.

    python -m kollm.eval.tasks.ko_quickstart_mc.build     # rewrite the JSON file
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
DATA = HERE / "ko_quickstart_mc.json"


def _questions(kind: str, facts: dict[str, str], template: str, rng: random.Random) -> list[dict]:
    answers = sorted(set(facts.values()))
    out: list[dict] = []
    for key, answer in facts.items():
        choices = [answer, *rng.sample([a for a in answers if a != answer], 3)]
        rng.shuffle(choices)
        out.append(
            {
                "id": f"{kind}-{len(out)}",
                "kind": kind,
                "question": template.format(key),
                "choices": choices,
                "answer": choices.index(answer),
            }
        )
    return out


def build() -> list[dict]:
    from kollm.data.synthetic import ANTONYMS, CAPITALS, ENGLISH, PROVINCES

    rng = random.Random(0)
    return [
        *_questions("capital", CAPITALS, "{}의 수도는 어디인가요?", rng),
        *_questions("province", PROVINCES, "{}의 도청 소재지는 어디인가요?", rng),
        *_questions("antonym", ANTONYMS, "'{}'의 반대말은 무엇인가요?", rng),
        *_questions("english", ENGLISH, "'{}'의 영어 단어는 무엇인가요?", rng),
    ]


def text() -> str:
    return json.dumps(build(), ensure_ascii=False, indent=1) + "\n"


if __name__ == "__main__":
    DATA.write_text(text(), encoding="utf-8")
    print(f"wrote {DATA}")
