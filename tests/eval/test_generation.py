"""Generation suites: metric functions on hand-worked cases, suite parsing, batched greedy generation."""

from __future__ import annotations

import json

import pytest
import sacrebleu

from kollm.errors import ConfigError
from kollm.eval.generation import (
    Case,
    generate,
    load_suite,
    render_prompts,
    run_suite,
    score,
    score_chrf,
    score_contains,
    score_exact,
    score_regex,
)
from tests.tiny import tiny_model, tiny_tokenizer


def test_exact_and_contains_normalize_korean_and_whitespace():
    decomposed = "서울".encode("utf-8").decode()  # composed
    nfd = __import__("unicodedata").normalize("NFD", "서울")
    assert nfd != decomposed
    assert score_exact(f"  {nfd} \n", ["서울"]) == 1.0
    assert score_exact("서울입니다", ["서울"]) == 0.0
    assert score_exact("부산", ["서울", "부산"]) == 1.0
    assert score_contains("대한민국의 수도는  서울입니다.", ["수도는 서울"]) == 1.0
    assert score_contains("대한민국의 수도는 부산", ["서울"]) == 0.0


def test_regex_searches_anywhere():
    assert score_regex("날짜: 2024-05-01 입니다", [r"\d{4}-\d{2}-\d{2}"]) == 1.0
    assert score_regex("날짜 없음", [r"\d{4}-\d{2}-\d{2}", r"^없"]) == 0.0
    assert score_regex("없음", [r"\d+", r"^없"]) == 1.0


def test_chrf_hand_cases():
    assert score_chrf("서울입니다", ["서울입니다"]) == pytest.approx(100.0)
    assert score_chrf("가나다", ["라마바"]) == pytest.approx(0.0)
    partial = score_chrf("서울은 수도", ["서울은 한국의 수도"])
    assert 0 < partial < 100
    assert partial == pytest.approx(sacrebleu.sentence_chrf("서울은 수도", ["서울은 한국의 수도"]).score)
    # with several references the best one counts
    assert score_chrf("서울입니다", ["부산", "서울입니다"]) == pytest.approx(100.0)


def test_score_means_over_cases_scored_with_each_metric():
    cases = [
        Case(prompt="a", expected="서울"),
        Case(prompt="b", expected=["부산"], metric="exact"),
        Case(prompt="c", expected=r"\d+", metric=["regex"]),
    ]
    result = score(cases, ["a", "b", "c"], ["서울이다", "부산", "12"], ["exact", "contains"])
    assert result.metrics == {"exact": 0.5, "contains": 1.0, "regex": 1.0}
    assert result.counts == {"exact": 2, "contains": 1, "regex": 1}
    assert result.cases[0].scores == {"exact": 0.0, "contains": 1.0}


def test_load_suite_reports_every_bad_line(tmp_path):
    path = tmp_path / "suite.jsonl"
    lines = [
        {"prompt": "수도는?", "expected": "서울"},
        {"prompt": "x", "expected": "y", "metric": "bleu"},
        {"prompt": "x"},
        "{not json",
        {"prompt": "x", "expected": "(", "metric": "regex"},
        {"prompt": [{"role": "user", "content": "안녕"}], "expected": ["안녕하세요"], "id": "greet"},
    ]
    path.write_text(
        "\n".join(line if isinstance(line, str) else json.dumps(line, ensure_ascii=False) for line in lines) + "\n"
    )
    with pytest.raises(ConfigError) as e:
        load_suite(path)
    text = str(e.value)
    assert "suite.jsonl:2: metric" in text and "suite.jsonl:3: expected: required field is missing" in text
    assert "suite.jsonl:4: not valid JSON" in text and "suite.jsonl:5: expected: invalid regular expression" in text
    assert "suite.jsonl:1" not in text and "suite.jsonl:6" not in text
    path.write_text("\n".join(json.dumps(line, ensure_ascii=False) for line in [lines[0], lines[5]]))
    cases = load_suite(path)
    assert [c.id for c in cases] == ["line 1", "greet"]
    with pytest.raises(ConfigError, match="does not exist"):
        load_suite(tmp_path / "missing.jsonl")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok, seed=3)


def test_left_padded_batches_generate_what_single_prompts_do(tok, model):
    prompts = ["안녕", "서울은 대한민국의", "오늘 날씨가 맑고 따뜻합니다. 한국어", "The quick"]
    one_by_one = [generate(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    batched = generate(model, tok, prompts, max_new_tokens=6, batch_size=4)
    assert batched == one_by_one
    assert any(o for o in batched)


def test_chat_template_is_applied_to_prompts(tok, model):
    cases = [Case(prompt="수도는?", expected="서울"), Case(prompt=[{"role": "user", "content": "안녕"}], expected="네")]
    texts, templated = render_prompts(tok, cases, chat=None)
    assert texts[0] == "<|im_start|>user\n수도는?<|im_end|>\n<|im_start|>assistant\n" and templated == [True, True]
    texts, templated = render_prompts(tok, cases, chat=False)
    assert texts[0] == "수도는?" and templated == [False, True]
    result = run_suite(model, tok, cases, max_new_tokens=4, batch_size=2)
    assert set(result.metrics) == {"exact", "contains", "chrf"} and len(result.cases) == 2
