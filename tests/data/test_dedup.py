"""Deduplication: exact keys, MinHash signatures equal to datasketch's, near-duplicates that differ only in
spacing or punctuation, precision/recall on planted near-duplicates."""

from __future__ import annotations

import numpy as np
import pytest
from datasketch import MinHash

from kollm.data.dedup import (
    DedupConfig,
    canonical,
    exact_key,
    jaccard,
    near_duplicates,
    shingle_hashes,
    signature,
    signatures_batch,
)
from kollm.data.synthetic import corpus_with_near_duplicates

A = "오늘은 날씨가 정말 좋네요. 공원에 가서 산책을 하고, 친구들과 맛있는 점심을 먹었습니다. 내일도 이렇게 맑았으면 좋겠어요!"


def test_signature_equals_datasketch_minhash():
    hashes = shingle_hashes(A, 5)
    m = MinHash(num_perm=64, seed=7, hashfunc=lambda x: x)
    m.update_batch(hashes.tolist())
    assert np.array_equal(signature(hashes, 64, 7), m.hashvalues)


def test_canonical_ignores_spacing_punctuation_and_case():
    assert canonical("안녕 하세요,  여러분!") == canonical("안녕하세요 여러분") == "안녕하세요여러분"
    assert canonical("Hello, WORLD") == "helloworld"


def test_exact_key_is_content_hash():
    assert exact_key(A) == exact_key(A) and exact_key(A) != exact_key(A + " ")


def test_near_duplicates_differing_only_in_spacing_or_punctuation():
    variants = [
        A,
        A.replace(" ", "  ").replace(".", "。"),
        A.replace(",", "").replace("!", "").replace(".", ""),
        A.replace("날씨가 정말", "날씨가정말"),
        "전혀 다른 문장입니다. 경제 성장률이 지난해보다 둔화되었고 수출도 줄었습니다. 정부는 대책을 발표했습니다.",
    ]
    sigs = signatures_batch(variants, DedupConfig())
    assert jaccard(sigs[0], sigs[1]) == 1.0
    dup_of = near_duplicates(sigs, np.ones(len(variants), bool), threshold=0.8)
    assert dup_of.tolist() == [-1, 0, 0, 0, -1]


def test_near_duplicates_skip_rows_not_kept_and_first_occurrence_wins():
    sigs = signatures_batch([A, A + " 정말로요", A], DedupConfig())
    assert near_duplicates(sigs, np.array([False, True, True]), 0.8).tolist() == [-1, -1, 1]


def test_planted_near_duplicates_precision_recall():
    texts, origin = corpus_with_near_duplicates(600, dup_fraction=0.15, seed=3)
    sigs = signatures_batch(texts, DedupConfig())
    dup_of = near_duplicates(sigs, np.ones(len(texts), bool), threshold=0.7)
    truth = np.array(origin) >= 0
    found = dup_of >= 0
    tp = int((truth & found).sum())
    precision = tp / max(found.sum(), 1)
    recall = tp / max(truth.sum(), 1)
    assert truth.sum() > 50
    assert precision >= 0.95 and recall >= 0.9, (precision, recall)


def test_empty_text_has_a_signature():
    assert signatures_batch(["", "!!!"], DedupConfig(num_perm=32)).shape == (2, 32)


def test_index_finds_the_candidates_datasketch_lsh_finds():
    """NearDupIndex bands signatures like datasketch's MinHashLSH: the same LSH candidates for every query."""
    from datasketch import LeanMinHash, MinHashLSH

    from kollm.data.dedup import NearDupIndex

    texts, _ = corpus_with_near_duplicates(400, dup_fraction=0.3, seed=4)
    sigs = signatures_batch(texts, DedupConfig())
    for threshold in (0.7, 0.8):
        ours, theirs = NearDupIndex(threshold, 128), MinHashLSH(threshold=threshold, num_perm=128)
        for i, sig in enumerate(sigs[:200]):
            ours.add(i, sig)
            theirs.insert(i, LeanMinHash(seed=1, hashvalues=sig, scheme="affine32"))
        for sig in sigs[200:]:
            found = set(theirs.query(LeanMinHash(seed=1, hashvalues=sig, scheme="affine32")))
            assert ours.candidates(sig) == found
        assert sum(bool(ours.candidates(s)) for s in sigs[200:]) > 20
        for i in range(0, 200, 3):
            ours.remove(i)
            theirs.remove(i)
        for sig in sigs[200:]:
            assert ours.candidates(sig) == set(theirs.query(LeanMinHash(seed=1, hashvalues=sig, scheme="affine32")))


def test_translit_key_meets_loanwords_in_hangul_and_latin_letters():
    from kollm.data.dedup import translit_key

    for hangul, latin in [
        ("데비안", "Debian"),
        ("우분투", "UBUNTU"),
        ("리눅스", "Linux"),
        ("파이썬", "Python"),
        ("커피", "coffee"),
    ]:
        a = shingle_hashes(f"{hangul}를 설치했다", 3, transliteration=True)
        b = shingle_hashes(f"{latin}를 설치했다", 3, transliteration=True)
        assert set(a.tolist()) == set(b.tolist()), (hangul, latin, translit_key(hangul), translit_key(latin))
    # different words stay apart, and punctuation, spacing and case still do not count
    assert translit_key("데비안") != translit_key("페도라")
    assert translit_key("Hello, WORLD!") == translit_key("hello world")


def test_transliterated_short_paragraphs_are_near_duplicates():
    """The planted set: 25 short paragraphs (32-98 characters), each with a spacing, a punctuation and a
    transliterated copy (데비안 -> Debian). Transliteration-aware dedup with the short-document threshold finds
    every copy and merges no two paragraphs; the Hangul-only comparison form misses transliterated copies."""
    from tests.data.loanwords import corpus

    texts, origin = corpus()
    truth = np.array(origin)

    def found(cfg: DedupConfig) -> np.ndarray:
        return near_duplicates(
            signatures_batch(texts, cfg),
            np.ones(len(texts), bool),
            cfg.threshold,
            cfg.short_doc_slack,
            cfg.min_threshold,
        )

    dup_of = found(DedupConfig())
    assert dup_of.tolist() == truth.tolist()  # every copy points at its own paragraph; no paragraph is dropped
    hangul = found(DedupConfig(transliteration=False, short_doc_slack=0))
    latin_copies = np.arange(3, len(texts), 4)
    assert (hangul[latin_copies] < 0).sum() >= 10  # what the issue found: transliterated copies survive
    assert (hangul[truth < 0] < 0).all()


def test_short_document_threshold():
    from kollm.data.dedup import pair_threshold, set_size

    assert pair_threshold(1000, 0.8, 20, 0.5) == 0.8  # long documents keep the threshold
    assert pair_threshold(100, 0.8, 20, 0.5) == pytest.approx(80 / 120)
    assert pair_threshold(30, 0.8, 20, 0.5) == 0.5  # never below min_threshold
    assert pair_threshold(30, 0.8, 0, 0.5) == 0.8
    sig = signatures_batch(["가나다라마바사아자차카타파하" * 3], DedupConfig(transliteration=False, shingle_size=3))[0]
    assert 10 <= set_size(sig) <= 18  # 14 distinct shingles, estimated from the signature


def test_min_threshold_above_threshold_is_a_config_error():
    with pytest.raises(ValueError, match="min_threshold"):
        DedupConfig(threshold=0.6, min_threshold=0.7)


def test_short_texts_that_differ_in_numbers_are_not_near_duplicates():
    """Templated rows (a question per number) stay apart: digits are not collapsed (1 / 11) and the
    short-document slack covers one changed word, not several."""
    texts = [
        f"{i}번째 질문입니다. 서울의 역사에 대해 알려 주세요.\n{i}번째 답변입니다. 서울은 {i * 7}년의 역사를 생각해 볼 수 있습니다."
        for i in range(40)
    ]
    cfg = DedupConfig()
    dup_of = near_duplicates(
        signatures_batch(texts, cfg), np.ones(len(texts), bool), cfg.threshold, cfg.short_doc_slack, cfg.min_threshold
    )
    assert (dup_of == -1).all()
