"""Morpheme-aware filters (tokenizer: kiwi, kiwipiepy's Korean analyser): repetition over morphemes whatever
the spacing, sentence counts, morpheme statistics in stats.json and the report, and the config checks."""

from __future__ import annotations

import textwrap

import pandas as pd
import pytest
from pydantic import ValidationError

import kollm
from kollm.data.filters import FilterConfig, quality_batch, quality_features, quality_reason, sentence_count
from kollm.data.report import render
from kollm.errors import ConfigError
from kollm.steps.prepare import Config, prepare_batches

# One sentence repeated with its spacing broken differently each time (particles and endings attached or
# split): whitespace words barely repeat, morphemes do.
SPACINGS = [
    "서울은 대한민국의 수도이며 인구가 가장 많은 도시입니다.",
    "서울은대한민국의 수도이며인구가 가장많은 도시입니다.",
    "서울 은 대한민국 의 수도 이며 인구 가 가장 많은 도시 입니다.",
    "서울은 대한 민국의수도이며 인구가가장 많은도시입니다.",
]
REPEATED = " ".join(SPACINGS * 3)
CLEAN = (
    "대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다. 국가는 법률이 정하는 바에 의하여 "
    "재외국민을 보호할 의무를 진다. 대한민국의 영토는 한반도와 그 부속도서로 한다. 대한민국은 통일을 지향하며, 자유민주적 기본질서에 "
    "입각한 평화적 통일 정책을 수립하고 이를 추진한다."
)


def test_morpheme_repetition_sees_through_broken_spacing():
    words = quality_features(REPEATED, 3, "whitespace")
    morphemes = quality_features(REPEATED, 5, "kiwi")
    assert morphemes.top_ngram_fraction > 0.2 >= words.top_ngram_fraction
    assert quality_reason(words, FilterConfig(repetition_min_words=20)) == ""
    assert (
        quality_reason(morphemes, FilterConfig(tokenizer="kiwi", repetition_min_words=20)) == "filter:repeated_ngrams"
    )
    clean = quality_features(CLEAN, 5, "kiwi")
    assert quality_reason(clean, FilterConfig(tokenizer="kiwi", repetition_min_words=20)) == ""
    assert clean.morphemes > clean.words and clean.sentences == 5
    assert sum(clean.pos) == clean.morphemes and clean.pos[0] > 0  # nouns counted


def test_sentence_counts_and_min_sentences():
    assert sentence_count("첫 문장입니다. 둘째 문장이에요! 셋째는?\n넷째 줄") == 4
    assert sentence_count("소수점 3.14는 문장을 나누지 않습니다.") == 1
    assert quality_features("안녕하세요. 반갑습니다.", 5, "kiwi").sentences == 2
    short = quality_features("한 문장만 있는 글입니다.", 3)
    assert quality_reason(short, FilterConfig(min_chars=5, min_sentences=2)) == "filter:too_few_sentences"
    assert quality_reason(short, FilterConfig(min_chars=5)) == ""


def test_quality_batch_records_text_statistics():
    batch = pd.DataFrame({"text": [CLEAN, "짧음"], "_reject": ["", ""], "_source": ["a", "a"]})
    out = quality_batch(batch, "corpus", FilterConfig(tokenizer="kiwi"))
    assert out["_reject"].tolist() == ["", "filter:too_short"]
    assert out["_sentences"].tolist()[0] == 5 and out["_morphemes"].tolist()[0] > 40
    assert (
        sum(out[f"_pos_{c}"].iloc[0] for c in ("noun", "predicate", "particle", "ending", "foreign", "other"))
        == out["_morphemes"].iloc[0]
    )


def test_prepare_with_kiwi_puts_morpheme_statistics_in_stats_and_report():
    texts = [CLEAN, REPEATED, "서버를 Linux로 옮겼습니다. 이제 관리가 쉬워졌어요. 모두 만족합니다."]
    batches = [pd.DataFrame({"text": texts, "_source": "f"})]
    kiwi = prepare_batches(
        batches, Config(filters={"tokenizer": "kiwi", "repetition_min_words": 20}, split={"eval_fraction": 0})
    )
    assert kiwi.counts.reasons == {"filter:repeated_ngrams": 1}
    stats = kiwi.stats
    assert stats["tokenizer"] == "kiwi" and stats["sentences_mean"] == 4.0
    assert stats["morphemes_mean"] > stats["words_mean"] and 1.5 < stats["morphemes_per_word"] < 4
    assert stats["pos_fraction"]["foreign"] > 0 and abs(sum(stats["pos_fraction"].values()) - 1) < 1e-9
    html = render(kiwi.report)
    assert "Morphemes per kept row" in html and "Parts of speech" in html and "morphemes per word" in html
    plain = prepare_batches(batches, Config(filters={"repetition_min_words": 20}, split={"eval_fraction": 0}))
    assert plain.counts.reasons == {} and plain.stats["tokenizer"] == "whitespace"
    assert "morphemes_mean" not in plain.stats and "Sentences per kept row" in render(plain.report)


def test_tokenizer_is_validated_and_the_error_names_the_field(tmp_path):
    with pytest.raises(ValidationError, match="tokenizer"):
        FilterConfig(tokenizer="mecab")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text(CLEAN, encoding="utf-8")
    (tmp_path / "kollm.yaml").write_text(
        textwrap.dedent("""\
        project: kiwi-test
        data:
          docs: {path: data}
        steps:
          - kind: prepare
            inputs: {source: docs}
            config: {filters: {tokenizer: mecab}}
        """),
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match=r"steps\[0\]\.config\.filters\.tokenizer"):
        kollm.load(tmp_path)


@pytest.mark.slow(reason="Kiwi tokenizes the corpus in one process and in two worker processes")
def test_kiwi_output_is_the_same_for_any_num_proc():
    from kollm.data.synthetic import corpus_with_near_duplicates

    texts, _ = corpus_with_near_duplicates(40, dup_fraction=0.2, seed=21)
    batches = [pd.DataFrame({"text": texts[i : i + 10], "_source": f"f{i}"}) for i in range(0, 40, 10)]
    cfg = {"filters": {"tokenizer": "kiwi"}, "split": {"eval_fraction": 0.2}, "batch_rows": 10}
    one = prepare_batches(batches, Config(**cfg))
    two = prepare_batches(batches, Config(**cfg, num_proc=2))
    assert one.train.equals(two.train) and one.eval.equals(two.eval) and one.stats == two.stats
    assert one.stats["morphemes_mean"] > 0
