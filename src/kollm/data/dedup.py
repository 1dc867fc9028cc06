"""Deduplication: exact (a hash of the normalized text) and near-duplicate (MinHash + LSH via datasketch).

Near-duplicates are found on a comparison form of the text, so texts that differ only in spacing or
punctuation ("안녕하세요, 여러분!" / "안녕 하세요 여러분") are the same text, and a loanword written in Hangul
and in Latin letters (데비안 / Debian, 리눅스 / Linux) meets itself:

1. `canonical`: lower-cased, every character that is not a letter or digit removed.
2. `transliteration: true` (the default), `translit_key`: every Hangul syllable is romanized (Revised
   Romanization, from the `korean-romanizer` package; one table of the 11,172 syllables built once), and the
   romanized and the Latin letters are folded alike into a coarse sound alphabet: vowels become "a", l -> r,
   f -> p, v -> b, c/q -> k, z -> j, x -> ks, the Korean epenthetic vowel ㅡ ("eu") is dropped, and runs of
   one letter collapse to one; English words first lose what Korean does not write (a silent final e, r after
   a vowel; th -> s, ph -> p, soft c -> s). 데비안 and Debian both become "dabaan" -> "daban", 서버 and
   server "saba".
   Why romanize Hangul rather than map Latin words to Hangul: romanization is a fixed syllable-by-syllable
   table (fast: one `str.translate`), while Latin -> Hangul needs word-level loanword rules and a
   dictionary (Debian -> 데비안, but data -> 데이터); the fold then absorbs the spellings where English and
   the Korean reading differ (리눅스 "rinukseu" / Linux, 파이썬 "paisseon" / Python). Shingles are k sound
   units (a unit ends after a vowel: about a syllable; 3 by default), so they span as much text as Hangul
   shingles and there are as many; digits are kept as they are (templated rows that differ in numbers stay apart).
3. The threshold accounts for short documents: one changed word changes about `shingle_size` + its length
   shingles whatever the document's length, which is most of a 40-character paragraph. Two texts are
   near-duplicates when their estimated Jaccard similarity is at least
   `max(min_threshold, min(threshold, (n - short_doc_slack) / (n + short_doc_slack)))`, n being the shingle
   count of the shorter one (estimated from its MinHash signature): long documents keep `threshold`.

The comparison form is only a key: the stored text keeps its punctuation and letters.

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

from kollm.data.config import DedupConfig as DedupConfig  # defined there (no numpy), named here too


_NON_WORD = re.compile(r"[\W_]+")


def canonical(text: str) -> str:
    """The near-duplicate key of a text: lower case, letters and digits only."""
    return _NON_WORD.sub("", text.lower())


# The sound fold, for Latin letters (from the text and from romanized Hangul alike). Vowels are one class:
# loanword vowels are spelled one way in English and read another way in Hangul (computer / 컴퓨터 "keompyuteo").
_LATIN_FOLD = {**dict.fromkeys("aeiouyw", "a"), "l": "r", "f": "p", "v": "b", "c": "k", "q": "k", "z": "j", "x": "ks"}
_DOUBLE_JAMO = {
    "kk": "k",
    "tt": "t",
    "pp": "p",
    "ss": "s",
    "jj": "j",
}  # tense consonants (ㄲ ㄸ ㅃ ㅆ ㅉ) read as plain ones


def _fold_latin(s: str) -> str:
    return "".join(_LATIN_FOLD.get(c, c) for c in s)


@lru_cache(maxsize=1)
def _translit_table() -> dict[int, str | None]:
    """Hangul syllable -> its folded romanization, Latin letter -> its folded letter, and what `canonical`
    removes (spaces, punctuation, symbols, "_") -> nothing: one str.translate table, one pass over a text."""
    from korean_romanizer.romanizer import Romanizer

    table: dict[int, str | None] = {cp: None for cp in range(0x20000) if _NON_WORD.fullmatch(chr(cp))}
    table.update({ord(c): f for c, f in _LATIN_FOLD.items()})
    for cp in range(0xAC00, 0xD7A4):
        rom = Romanizer(chr(cp)).romanize().replace("eu", "")  # ㅡ: the vowel Korean adds to English clusters (스 seu)
        for tense, plain in _DOUBLE_JAMO.items():
            rom = rom.replace(tense, plain)
        table[cp] = _fold_latin(rom)
    return table


_LATIN_WORD = re.compile(r"[a-z]+")
_R_NOT_BEFORE_VOWEL = re.compile(r"r(?![aeiouy])")


def _latin_word(m: re.Match[str]) -> str:
    """English spelling -> how Korean writes the word, for what the letter fold cannot see: a silent final e
    (google / 구글), r after a vowel (server / 서버), soft c (center / 센터), ck, th (python / 파이썬), ph."""
    w = m.group()
    if len(w) > 3 and w[-1] == "e":
        w = w[:-1]
    if "c" in w:
        w = w.replace("ck", "k").replace("ce", "se").replace("ci", "si").replace("cy", "sy")
    if "h" in w:
        w = w.replace("th", "s").replace("ph", "p")
    return _R_NOT_BEFORE_VOWEL.sub("", w) if "r" in w else w


def _latin_respelled(text: str) -> str:
    """Lower case, with English words respelled (`_latin_word`); spaces and punctuation still there."""
    lower = text.lower()
    if _LATIN_WORD.search(lower):  # word rules need the word boundaries `canonical` removes
        lower = _LATIN_WORD.sub(_latin_word, lower)
    return lower


def translit_key(text: str) -> str:
    """The transliteration-aware near-duplicate key: `canonical`, with English words respelled as Korean
    writes them, romanized and sound-folded (see the module docstring). Runs of one letter are collapsed when
    shingling (`shingle_hashes`), not here."""
    return _latin_respelled(text).translate(_translit_table())


def exact_key(text: str) -> str:
    """The exact-duplicate key of a (normalized) text."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


@lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from datasketch import MinHash

    a, b = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
    return a.astype(np.uint32), b.astype(np.uint32)


_P = np.uint64(1_000_003)
_DIGIT_9 = np.uint64(ord("9"))
_VOWEL = np.uint64(ord("a"))  # every vowel, once folded


def shingle_hashes(text: str, k: int, transliteration: bool = False) -> np.ndarray:
    """32-bit hashes of the shingles of the text's comparison form (one shingle if it is shorter): k characters
    of `canonical`, or with transliteration k sound units of `translit_key` (a unit: letters up to and with
    a vowel, about a syllable; so a shingle spans as much text in both forms and there are as many).
    May repeat a hash; a MinHash does not care."""
    key = translit_key(text) if transliteration else canonical(text)
    if not key:
        return np.zeros(0, dtype=np.uint32)
    cps = np.frombuffer(key.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if transliteration:
        cps = _unit_hashes(cps)
    k = min(k, len(cps))
    n = len(cps) - k + 1
    h = cps[:n].copy()
    for j in range(1, k):
        h *= _P
        h += cps[j : j + n]
    h ^= h >> np.uint64(29)
    return (h ^ (h >> np.uint64(32))).astype(np.uint32)


_B = 0x100000001B3  # odd, so invertible modulo 2**64
_POWERS: list[np.ndarray] = [np.ones(1, np.uint64), np.ones(1, np.uint64)]  # B**i and B**-i (mod 2**64), i < len


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    if len(_POWERS[0]) <= n:
        size = 1 << n.bit_length()
        with np.errstate(over="ignore"):
            pw = np.cumprod(np.full(size, _B, np.uint64))
            ipw = np.cumprod(np.full(size, pow(_B, -1, 1 << 64), np.uint64))
        one = np.ones(1, np.uint64)
        _POWERS[:] = [np.concatenate((one, pw[:-1])), np.concatenate((one, ipw[:-1]))]
    return _POWERS[0], _POWERS[1]


def _unit_hashes(cps: np.ndarray) -> np.ndarray:
    """The transliterated key's code points -> one 64-bit hash per sound unit, after collapsing runs of one
    letter (coffee / 커피 -> "kapa"; digits are not collapsed: 1 / 11). A unit ends after each vowel ("a").
    Vectorized polynomial hashes of variable-length spans: with C = cumsum(cp[j] * B**-(j+1)), the span
    [s, e) hashes to B**e * (C[e] - C[s]) = sum cp[j] * B**(e-1-j), which does not depend on where it sits."""
    if len(cps) > 1:
        cps = cps[np.concatenate(([True], (cps[1:] != cps[:-1]) | (cps[1:] <= _DIGIT_9)))]
    n = len(cps)
    pw, ipw = _powers(n + 1)
    ends = np.flatnonzero(cps == _VOWEL) + 1
    if not len(ends) or ends[-1] != n:
        ends = np.append(ends, n)
    starts = np.concatenate((np.zeros(1, ends.dtype), ends[:-1]))
    with np.errstate(over="ignore"):
        c = np.concatenate((np.zeros(1, np.uint64), np.cumsum(cps * ipw[1 : n + 1], dtype=np.uint64)))
        return pw[ends] * (c[ends] - c[starts])


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
    k = cfg.shingle_chars
    return _signatures([shingle_hashes(t, k, cfg.transliteration) for t in texts], cfg.num_perm, cfg.seed)


def jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Estimated Jaccard similarity of two signatures."""
    return np.count_nonzero(sig_a == sig_b) / len(sig_a)


_MAX_HASH = float(np.iinfo(np.uint32).max)


def set_size(sig: np.ndarray) -> float:
    """The number of distinct shingles a signature was made from, estimated from it (datasketch's
    `MinHash.count`; about 9 % error at 128 permutations). 0 for an empty set."""
    total = float(np.sum(sig, dtype=np.float64)) / _MAX_HASH
    return len(sig) / total - 1 if total else 0.0


def pair_threshold(n: float, threshold: float, slack: int, min_threshold: float) -> float:
    """The Jaccard a pair whose smaller side has n shingles needs (see the module docstring)."""
    if slack <= 0:
        return threshold
    return max(min_threshold, min(threshold, (n - slack) / (n + slack) if n > slack else 0.0))


@lru_cache(maxsize=16)
def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) that `datasketch.MinHashLSH(threshold, num_perm)` picks (equal false-positive and
    false-negative weights)."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


class _Bands:
    """The banding of datasketch's `MinHashLSH` for one threshold, kept as one dict per band from the band's bytes
    to the keys holding it: a lookup per band, without building a `LeanMinHash` per row."""

    def __init__(self, threshold: float, num_perm: int):
        self.bands, rows = lsh_bands(threshold, num_perm)
        self._width = rows * 4  # bytes of a band of uint32 values
        # band bytes -> the key holding it, or a list of keys when several do (few): ints are not tracked by
        # the garbage collector, so a big index does not slow every collection down
        self.tables: list[dict[bytes, int | list[int]]] = [{} for _ in range(self.bands)]

    def keys(self, sig: np.ndarray) -> list[bytes]:
        row, w = sig.astype(np.uint32, copy=False).tobytes(), self._width
        return [row[i : i + w] for i in range(0, self.bands * w, w)]

    def candidates(self, keys: list[bytes], found: set[int]) -> set[int]:
        for table, k in zip(self.tables, keys):
            held = table.get(k)
            if held is None:
                continue
            if isinstance(held, int):
                found.add(held)
            else:
                found.update(held)
        return found

    def add(self, key: int, keys: list[bytes]) -> None:
        for table, k in zip(self.tables, keys):
            held = table.get(k)
            if held is None:
                table[k] = key
            elif isinstance(held, int):
                table[k] = [held, key]
            else:
                held.append(key)

    def remove(self, key: int, keys: list[bytes]) -> None:
        for table, k in zip(self.tables, keys):
            held = table[k]
            if isinstance(held, int):
                del table[k]
            else:
                held.remove(key)
                if len(held) == 1:
                    table[k] = held[0]


_Keys = tuple[list[bytes], list[bytes] | None]  # a signature's band keys: main bands, short-document bands


class NearDupIndex:
    """A MinHash LSH index of kept rows. `match` returns the key of a kept row whose estimated Jaccard
    similarity is at least the threshold (LSH candidates are verified), else None.

    The banding is datasketch's `MinHashLSH` (the same bands and rows per band, so the same candidates; several
    times faster; this runs in one process). With `short_doc_slack`, a pair's threshold depends on its smaller
    side's size (`pair_threshold`), and short rows are also banded for `min_threshold`: only rows with fewer
    than `short_size` shingles, since a pair with a lower threshold has a side below `n_full` (where the
    threshold is whole again) and Jaccard <= smaller / larger, so its larger side is below n_full / min_threshold
    (with a margin for the size estimate). Long documents then cost what they did without the slack."""

    def __init__(
        self, threshold: float, num_perm: int = 128, short_doc_slack: int = 0, min_threshold: float | None = None
    ):
        self.threshold = threshold
        self.slack = max(0, short_doc_slack)
        self.min_threshold = threshold if min_threshold is None or not self.slack else min(min_threshold, threshold)
        self.main = _Bands(threshold, num_perm)
        self.short = _Bands(self.min_threshold, num_perm) if self.min_threshold < threshold else None
        n_full = self.slack * (1 + threshold) / (1 - threshold)
        self.short_size = 1.25 * n_full / self.min_threshold if self.short else 0.0
        self.sigs: dict[int, np.ndarray] = {}
        self.sizes: dict[int, float] = {}

    @classmethod
    def from_config(cls, cfg: DedupConfig) -> NearDupIndex:
        return cls(cfg.threshold, cfg.num_perm, cfg.short_doc_slack, cfg.min_threshold)

    def _keys(self, sig: np.ndarray) -> tuple[_Keys, float]:
        size = set_size(sig) if self.short else 0.0
        short = self.short.keys(sig) if self.short and size < self.short_size else None
        return (self.main.keys(sig), short), size

    def candidates(self, sig: np.ndarray) -> set[int]:
        """Keys of the kept rows that share a band with `sig` (not yet verified)."""
        (main, short), _ = self._keys(sig)
        found = self.main.candidates(main, set())
        return self.short.candidates(short, found) if self.short and short else found

    def _match(self, sig: np.ndarray, keys: _Keys, size: float) -> int | None:
        best, best_j = None, -1.0
        found = self.main.candidates(keys[0], set())
        if self.short and keys[1]:
            self.short.candidates(keys[1], found)
        for key in found:
            j = jaccard(sig, self.sigs[key])
            need = (
                pair_threshold(min(size, self.sizes[key]), self.threshold, self.slack, self.min_threshold)
                if self.short
                else self.threshold
            )
            if j >= need and (best is None or j > best_j or (j == best_j and key < best)):
                best, best_j = key, j
        return best

    def _add(self, key: int, sig: np.ndarray, keys: _Keys, size: float) -> None:
        self.main.add(key, keys[0])
        if self.short and keys[1]:
            self.short.add(key, keys[1])
        self.sigs[key] = sig
        if self.short:
            self.sizes[key] = size

    def match(self, sig: np.ndarray) -> int | None:
        return self._match(sig, *self._keys(sig))

    def add(self, key: int, sig: np.ndarray) -> None:
        self._add(key, sig, *self._keys(sig))

    def match_or_add(self, key: int, sig: np.ndarray) -> int | None:
        """The kept row `sig` near-duplicates, or None after adding it as kept."""
        keys, size = self._keys(sig)
        found = self._match(sig, keys, size)
        if found is None:
            self._add(key, sig, keys, size)
        return found

    def remove(self, key: int) -> None:
        (main, short), _ = self._keys(self.sigs.pop(key))
        self.sizes.pop(key, None)
        self.main.remove(key, main)
        if self.short and short:
            self.short.remove(key, short)


def near_duplicates(
    sigs: np.ndarray, keep: np.ndarray, threshold: float, short_doc_slack: int = 0, min_threshold: float | None = None
) -> np.ndarray:
    """For rows in order, -1 for a row to keep, else the index of the earlier kept row it near-duplicates.
    Rows with keep=False are skipped (and stay -1). One pass, first occurrence wins; deterministic."""
    index = NearDupIndex(threshold, sigs.shape[1], short_doc_slack, min_threshold)
    dup_of = np.full(len(sigs), -1, dtype=np.int64)
    for i in range(len(sigs)):
        if not keep[i]:
            continue
        j = index.match_or_add(i, sigs[i])
        if j is not None:
            dup_of[i] = j
    return dup_of
