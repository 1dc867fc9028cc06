"""Deduplication: exact keys, MinHash signatures equal to datasketch's, near-duplicates that differ only in
spacing or punctuation, precision/recall on planted near-duplicates."""

from __future__ import annotations

import numpy as np
from datasketch import MinHash

from kollm.data.dedup import DedupConfig, canonical, exact_key, jaccard, near_duplicates, shingle_hashes, signature, signatures_batch
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
