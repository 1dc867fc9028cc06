"""Korean normalization: edge cases and properties (idempotent, never loses a Hangul syllable)."""

from __future__ import annotations

import unicodedata

import pandas as pd
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kollm.data.korean import hangul_ratio, normalize_text
from kollm.steps.prepare import Config, transform_batch


def count_hangul_syllables(text: str) -> int:
    return sum(1 for ch in text if "가" <= ch <= "힣")


def test_decomposed_syllables_and_conjoining_jamo_are_composed():
    nfd = unicodedata.normalize("NFD", "한국어 자연어 처리")
    assert nfd != "한국어 자연어 처리"
    assert normalize_text(nfd) == "한국어 자연어 처리"
    assert normalize_text("\u1112\u1161\u11ab\u1100\u1173\u11af") == "한글"


def test_leftover_conjoining_jamo_become_compatibility_jamo():
    assert normalize_text("ᄏᄏᄏ 웃겨") == "ㅋㅋㅋ 웃겨"
    assert normalize_text("ㅋㅋㅋ ㅠㅠ") == "ㅋㅋㅋ ㅠㅠ"  # compatibility jamo are left alone (not composed)


def test_invisible_characters_removed_but_emoji_zwj_sequences_kept():
    assert normalize_text("안\u200b녕\ufeff하\u00ad세요\u200e") == "안녕하세요"
    assert normalize_text("한\u0000국\u0007어") == "한국어"
    assert normalize_text("개발자 👩\u200d💻 입니다") == "개발자 👩\u200d💻 입니다"
    assert normalize_text("가\u200d나") == "가나"
    assert normalize_text("이름\u3164입니다") == "이름입니다"  # Hangul filler used as an invisible character


def test_full_width_ascii_digits_and_spaces():
    assert normalize_text("ＡＢＣ　１２３！ 가격은 ￦５,０００") == "ABC 123! 가격은 ₩5,000"
    assert normalize_text("서울\u00a0특별시\u2003종로구") == "서울 특별시 종로구"
    assert normalize_text("ﾡﾢ") == "ㄱㄲ"  # half-width Hangul letters


def test_punctuation_emoji_mixed_scripts_and_meaning_kept():
    text = "「대한민국」은 민주공화국이다! 3·1운동(1919년)… 정말? 😀 Hello, 世界 #태그 @사람 100%"
    assert normalize_text(text) == text


def test_whitespace_and_line_breaks():
    assert (
        normalize_text("  첫 줄   입니다\t\t끝  \r\n\r\n\r\n\r\n둘째 줄 \u2028셋째")
        == "첫 줄 입니다 끝\n\n둘째 줄\n셋째"
    )


def test_hangul_ratio():
    assert hangul_ratio("한국어 text") == 3 / 7
    assert hangul_ratio("1234 !!!") == 0.0
    assert hangul_ratio("순수한 한국어") == 1.0


def test_prepare_normalizes_every_text_of_every_kind():
    def normalized(raw: pd.DataFrame, kind: str) -> pd.Series:
        return transform_batch(raw, Config(dataset=kind)).iloc[0]

    nfd = unicodedata.normalize("NFD", "안녕")
    assert normalized(pd.DataFrame({"text": [f" {nfd}\u200b "]}), "corpus")["text"] == "안녕"
    msgs = pd.DataFrame({"messages": [[{"role": "user", "content": nfd}, {"role": "assistant", "content": "ＯＫ"}]]})
    assert [m["content"] for m in normalized(msgs, "instructions")["messages"]] == ["안녕", "OK"]
    prefs = pd.DataFrame({"prompt": [[{"role": "user", "content": nfd}]], "chosen": ["１"], "rejected": [" 2 "]})
    out = normalized(prefs, "preferences")
    assert (out["prompt"][0]["content"], out["chosen"], out["rejected"]) == ("안녕", "1", "2")
    assert msgs["messages"][0][0]["content"] == nfd  # pure: the input batch is unchanged


_korean_text = st.text(
    alphabet=st.one_of(
        st.characters(min_codepoint=0xAC00, max_codepoint=0xD7A3),
        st.characters(min_codepoint=0x1100, max_codepoint=0x11FF),
        st.characters(min_codepoint=0x3130, max_codepoint=0x318F),
        st.sampled_from(list(" \t\n\r\u200b\u200d\ufeff\u00a0\u3000ＡＢ１２！。、·…「」😀👩💻\u0301\u0000ａ")),
        st.characters(),
    ),
    max_size=80,
)


@settings(max_examples=400, deadline=None)
@given(_korean_text)
def test_normalization_is_idempotent(text):
    once = normalize_text(text)
    assert normalize_text(once) == once


@settings(max_examples=400, deadline=None)
@given(_korean_text)
def test_normalization_never_drops_hangul_syllables(text):
    assert count_hangul_syllables(normalize_text(text)) >= count_hangul_syllables(text)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from(["가", "한", "국", "어", "힣", " ", ",", ".", "!", "a", "1", "😀", "\u200b", "\n"]), max_size=60
    )
)
def test_syllables_are_kept_in_order(chars):
    text = "".join(chars)
    syllables = [c for c in text if "가" <= c <= "힣"]
    assert [c for c in normalize_text(text) if "가" <= c <= "힣"] == syllables


def test_code_indentation_and_fenced_blocks_are_kept():
    code = "def f(x):\n    if x:\n\treturn 1  \n    return 0"
    assert normalize_text(code) == "def f(x):\n    if x:\n\treturn 1\n    return 0"
    answer = "예시 코드입니다:\n\n```python\nx  = 1   # 정렬된  주석\ny  = 22  # 둘째\n```\n끝   입니다"
    assert (
        normalize_text(answer)
        == "예시 코드입니다:\n\n```python\nx  = 1   # 정렬된  주석\ny  = 22  # 둘째\n```\n끝 입니다"
    )
    assert normalize_text("목록:\n  - 하나   둘\n  - 셋 ") == "목록:\n  - 하나 둘\n  - 셋"


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(["```", "`", " ", "  ", "\t", "\n", "\r\n", "가", "한", "x", "\u3000", "\u2028"]), max_size=40
    )
)
def test_normalization_with_indentation_and_fences_is_idempotent(parts):
    text = "".join(parts)
    once = normalize_text(text)
    assert normalize_text(once) == once
    assert [c for c in once if "가" <= c <= "힣"] == [c for c in text if "가" <= c <= "힣"]


_TEXT = st.lists(
    st.sampled_from(
        [*"가나다 한국어\t\n\u3000\u00a0\u2003abc,.!?_-~`", "```", "데비안", "  \n", "Google", "서버", "  "]
    ),
    max_size=40,
).map("".join)


@given(st.one_of(_TEXT, st.text(max_size=60)))  # and any Unicode (jamo, unassigned code points, lone surrogates)
@example("가 \n나")
@example("\ud7a4\ua97d\u3164ㄱ\u1100\ud800A1_")
@settings(max_examples=400, deadline=None)
def test_fast_paths_give_what_the_plain_forms_give(text):
    """The shortcuts of the prepare hot path (spaces without regex scans when nothing matches, whitespace counted by
    str.split) equal the plain regex forms exactly."""
    import re

    from kollm.data import korean
    from kollm.data.filters import symbol_ratio

    plain_spaces = (
        text if korean._FENCE in text else korean._INNER_SPACES.sub(" ", korean._TRAILING_SPACES.sub("", text))
    )
    if korean._FENCE not in text:
        assert korean._spaces(text) == plain_spaces
    letters = korean._NOT_LETTER.sub("", text)
    assert korean.hangul_ratio(text) == (len(korean._NOT_HANGUL.sub("", letters)) / len(letters) if letters else 0.0)
    nonspace = len(text) - sum(map(len, re.findall(r"\s+", text)))
    symbols = sum(map(len, re.findall(r"[^\w\s]+", text)))
    assert symbol_ratio(text) == (symbols / nonspace if nonspace else 0.0)
