"""Deduplication: exact (a hash of the normalized text) and near-duplicate (MinHash + LSH via datasketch).

Near-duplicates are found on a canonical form of the text: lower-cased, with every character that is not
a letter or digit removed, so texts that differ only in spacing or punctuation ("안녕하세요, 여러분!" /
"안녕 하세요 여러분") are the same text. The canonical form is only a key: the stored text keeps its
punctuation.

MinHash signatures are computed with numpy over character shingles (k-grams of code points), using the
permutations of a `datasketch.MinHash` and its "affine32" scheme, so each signature equals what
`datasketch.MinHash(hashfunc=identity).update_batch(shingle_hashes)` gives (a test checks this), only
faster. `signatures_batch` is a pure function over a batch (it runs in worker processes);
`NearDupIndex` (the banding of `datasketch.MinHashLSH`, a test checks it finds the same candidates) runs in
one process and keeps the first of each group.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache

import numpy as np
from pydantic import BaseModel, Field

from kollm.pipeline.step import STRICT


class DedupConfig(BaseModel):
    model_config = STRICT
    exact: bool = Field(True, description="Drop rows whose normalized text equals an earlier row's (reason dedup:exact).")
    near: bool = Field(True, description="Drop rows that are near-duplicates of an earlier row (reason dedup:near).")
    threshold: float = Field(
        0.8, gt=0, lt=1, description="Jaccard similarity of character shingles above which two rows are near-duplicates."
    )
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (more: more accurate, slower).")
    shingle_size: int = Field(5, ge=1, le=32, description="Characters per shingle (letters and digits only; spaces and punctuation ignored).")
    seed: int = Field(1, description="MinHash seed.")


_NON_WORD = re.compile(r"[\W_]+")


def canonical(text: str) -> str:
    """The near-duplicate key of a text: lower case, letters and digits only."""
    return _NON_WORD.sub("", text.lower())


def exact_key(text: str) -> str:
    """The exact-duplicate key of a (normalized) text."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


@lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from datasketch import MinHash

    a, b = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
    return a.astype(np.uint32), b.astype(np.uint32)


_P = np.uint64(1_000_003)


def shingle_hashes(text: str, k: int) -> np.ndarray:
    """32-bit hashes of the k-character shingles of the canonical text (one shingle if it is shorter).
    May repeat a hash; a MinHash does not care."""
    key = canonical(text)
    if not key:
        return np.zeros(0, dtype=np.uint32)
    cps = np.frombuffer(key.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    k = min(k, len(cps))
    n = len(cps) - k + 1
    h = cps[:n].copy()
    for j in range(1, k):
        h *= _P
        h += cps[j : j + n]
    h ^= h >> np.uint64(29)
    return (h ^ (h >> np.uint64(32))).astype(np.uint32)


def _fmix32(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def signature(hashes: np.ndarray, num_perm: int = 128, seed: int = 1) -> np.ndarray:
    """The MinHash signature (uint32[num_perm]) of a set of 32-bit shingle hashes (datasketch affine32 scheme)."""
    return _signatures([hashes], num_perm, seed)[0]


def _signatures(hash_lists: list[np.ndarray], num_perm: int, seed: int, chunk: int = 8192) -> np.ndarray:
    """Signatures of many shingle sets: per document, its shingles times every permutation in one numpy
    product, then the minimum per permutation. (Per document beats one np.minimum.reduceat over a block.)"""
    a, b = _permutations(num_perm, seed)
    out = np.full((len(hash_lists), num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
    with np.errstate(over="ignore"):
        for d, hashes in enumerate(hash_lists):
            mixed = _fmix32(hashes)
            for i in range(0, len(mixed), chunk):
                part = mixed[i : i + chunk, None] * a[None, :] + b[None, :]
                np.minimum(out[d], part.min(axis=0), out=out[d])
    return out


def signatures_batch(texts: list[str], cfg: DedupConfig) -> np.ndarray:
    """MinHash signatures of many texts: uint32[len(texts), num_perm]. Pure; runs in worker processes."""
    return _signatures([shingle_hashes(t, cfg.shingle_size) for t in texts], cfg.num_perm, cfg.seed)


def jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Estimated Jaccard similarity of two signatures."""
    return np.count_nonzero(sig_a == sig_b) / len(sig_a)


@lru_cache(maxsize=16)
def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) that `datasketch.MinHashLSH(threshold, num_perm)` picks (equal false-positive and
    false-negative weights)."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


class NearDupIndex:
    """A MinHash LSH index of kept rows. `match` returns the key of a kept row whose estimated Jaccard
    similarity is at least the threshold (LSH candidates are verified), else None.

    The banding is datasketch's `MinHashLSH` (the same bands and rows per band, so the same candidates), kept
    as one dict per band from the band's bytes to the keys holding it: a lookup per band, without building a
    `LeanMinHash` per row (several times faster; this runs in one process)."""

    def __init__(self, threshold: float, num_perm: int = 128):
        self.threshold = threshold
        self.bands, rows = lsh_bands(threshold, num_perm)
        self._width = rows * 4  # bytes of a band of uint32 values
        # band bytes -> the key holding it, or a list of keys when several do (few): ints are not tracked by
        # the garbage collector, so a big index does not slow every collection down
        self.tables: list[dict[bytes, int | list[int]]] = [{} for _ in range(self.bands)]
        self.sigs: dict[int, np.ndarray] = {}

    def _keys(self, sig: np.ndarray) -> list[bytes]:
        row, w = sig.astype(np.uint32, copy=False).tobytes(), self._width
        return [row[i : i + w] for i in range(0, self.bands * w, w)]

    def _candidates(self, keys: list[bytes]) -> set[int]:
        found: set[int] = set()
        for table, k in zip(self.tables, keys):
            held = table.get(k)
            if held is None:
                continue
            if type(held) is int:
                found.add(held)
            else:
                found.update(held)
        return found

    def candidates(self, sig: np.ndarray) -> set[int]:
        """Keys of the kept rows that share a band with `sig` (not yet verified)."""
        return self._candidates(self._keys(sig))

    def _match(self, sig: np.ndarray, keys: list[bytes]) -> int | None:
        best, best_j = None, -1.0
        for key in self._candidates(keys):
            j = jaccard(sig, self.sigs[key])
            if j >= self.threshold and (j > best_j or (j == best_j and key < best)):
                best, best_j = key, j
        return best

    def _add(self, key: int, sig: np.ndarray, keys: list[bytes]) -> None:
        for table, k in zip(self.tables, keys):
            held = table.get(k)
            if held is None:
                table[k] = key
            elif type(held) is int:
                table[k] = [held, key]
            else:
                held.append(key)
        self.sigs[key] = sig

    def match(self, sig: np.ndarray) -> int | None:
        return self._match(sig, self._keys(sig))

    def add(self, key: int, sig: np.ndarray) -> None:
        self._add(key, sig, self._keys(sig))

    def match_or_add(self, key: int, sig: np.ndarray) -> int | None:
        """The kept row `sig` near-duplicates, or None after adding it as kept."""
        keys = self._keys(sig)
        found = self._match(sig, keys)
        if found is None:
            self._add(key, sig, keys)
        return found

    def remove(self, key: int) -> None:
        for table, k in zip(self.tables, self._keys(self.sigs.pop(key))):
            held = table[k]
            if type(held) is int:
                del table[k]
            else:
                held.remove(key)
                if len(held) == 1:
                    table[k] = held[0]


def near_duplicates(sigs: np.ndarray, keep: np.ndarray, threshold: float) -> np.ndarray:
    """For rows in order, -1 for a row to keep, else the index of the earlier kept row it near-duplicates.
    Rows with keep=False are skipped (and stay -1). One pass, first occurrence wins; deterministic."""
    index = NearDupIndex(threshold, sigs.shape[1])
    dup_of = np.full(len(sigs), -1, dtype=np.int64)
    for i in range(len(sigs)):
        if not keep[i]:
            continue
        j = index.match_or_add(i, sigs[i])
        if j is not None:
            dup_of[i] = j
    return dup_of
