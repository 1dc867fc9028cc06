"""Quality filters: each filter rejects what it should, with its reason, and passes clean Korean text."""

from __future__ import annotations

import pandas as pd
import pytest
from pydantic import ValidationError

from kollm.data.filters import (
    FilterConfig,
    dup_line_fraction,
    quality_batch,
    quality_features,
    quality_reason,
    symbol_ratio,
    top_ngram_fraction,
)

CLEAN = "대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다. 국가는 법률이 정하는 바에 의하여 재외국민을 보호할 의무를 진다."


def reason(text: str, **cfg) -> str:
    return quality_reason(quality_features(text), FilterConfig(**cfg))


def test_clean_korean_passes():
    assert reason(CLEAN) == ""


def test_length_limits():
    assert reason("짧은 글", min_chars=20) == "filter:too_short"
    assert reason(CLEAN * 10, max_chars=500) == "filter:too_long"


def test_hangul_ratio():
    english = "This sentence is written almost entirely in English with one 단어 only, which is not Korean text."
    assert reason(english) == "filter:low_hangul_ratio"
    assert reason(english, min_hangul_ratio=0) == ""


def test_repeated_lines_and_ngrams():
    lines = "\n".join(
        ["오늘의 특가 상품을 확인하세요 지금 바로 구매"] * 6 + ["감사합니다 좋은 하루 보내세요 여러분 모두"]
    )
    assert dup_line_fraction(lines) > 0.8
    assert reason(lines) == "filter:repeated_lines"
    spam = " ".join(["최저가 보장 이벤트"] * 15) + " 지금 확인하세요"
    assert top_ngram_fraction(spam, 3) > 0.5
    assert reason(spam) == "filter:repeated_ngrams"


def test_short_texts_skip_the_repetition_checks():
    qa = "12 더하기 7은 얼마인가요?\n12 더하기 7은 19입니다."
    assert reason(qa, min_chars=10) == ""


def test_symbol_ratio():
    junk = "★★★ ☆☆☆ ###### $$$ 대박 !!!!!! ~~~~ ^^^^ ****** ▶▶▶▶ 클릭 <<<<>>>>"
    assert symbol_ratio(junk) > 0.5
    assert reason(junk, min_chars=10) == "filter:too_many_symbols"
    assert symbol_ratio(CLEAN) < 0.1


def test_quality_batch_keeps_prior_rejections_and_records_features():
    batch = pd.DataFrame({"text": [CLEAN, "짧다", None], "_reject": ["", "", "schema:missing_text"]})
    out = quality_batch(batch, "corpus", FilterConfig())
    assert out["_reject"].tolist() == ["", "filter:too_short", "schema:missing_text"]
    assert out["_chars"][0] == len(CLEAN) and out["_hangul_ratio"][0] > 0.9


def test_preference_rejected_reply_is_not_filtered():
    batch = pd.DataFrame(
        {
            "prompt": [[{"role": "user", "content": "대한민국의 수도는 어디인가요? 자세히 알려 주세요."}]],
            "chosen": ["대한민국의 수도는 서울입니다."],
            "rejected": ["!!!! ???? ★★★★ ####"],
            "_reject": [""],
        }
    )
    assert quality_batch(batch, "preferences", FilterConfig())["_reject"][0] == ""


def test_config_checks_ranges():
    with pytest.raises(ValidationError, match="max_chars"):
        FilterConfig(min_chars=100, max_chars=50)
    with pytest.raises(ValidationError):
        FilterConfig(min_hangul_ratio=1.5)
