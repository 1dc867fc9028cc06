"""Quality filters: length, Hangul ratio, repetition (duplicate lines, repeated n-grams), symbol ratio and
sentence count.

`quality_features` measures a text; `quality_reason` turns measurements into a rejection reason (or "");
`quality_batch` does both over a canonical pandas batch and records the features for the report.

`tokenizer: whitespace` (the default) counts words split on spaces; `tokenizer: kiwi` analyses each text into
morphemes with kiwipiepy (its model ships in the `kiwipiepy_model` wheel: nothing is downloaded). Korean
spacing is unreliable (particles attach to words, spacing errors are common), so with kiwi the repeated
n-grams are n-grams of morphemes (form and tag), sentences are kiwi's sentences, and the step's stats.json and
report also describe the morphemes (per text, per word, the share of each part of speech). Kiwi is much slower
than the rest of `prepare` (benchmarks/prepare_throughput.py --compare tokenizer-kiwi measures it).
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd

from kollm.data.config import FilterConfig
from kollm.data.korean import hangul_ratio
from kollm.data.schema import REJECT, filter_text


# Parts of speech counted in the stats (kiwi's Sejong tags by their first letters): nouns, predicates
# (verbs, adjectives, copulas), particles, endings, foreign words and Hanja; everything else is "other".
POS_CLASSES = ("noun", "predicate", "particle", "ending", "foreign", "other")
_POS_OF = {"N": "noun", "V": "predicate", "J": "particle", "E": "ending"}


def pos_class(tag: str) -> str:
    if tag in ("SL", "SH"):
        return "foreign"
    return _POS_OF.get(tag[:1], "other")


@dataclass(frozen=True)
class Features:
    chars: int
    hangul_ratio: float
    dup_line_fraction: float
    top_ngram_fraction: float
    symbol_ratio: float
    words: int = 0
    sentences: int = 0
    morphemes: int = 0  # with tokenizer: kiwi
    pos: tuple[int, ...] = ()  # morphemes per POS_CLASSES, with tokenizer: kiwi


_SYMBOL_RUNS = re.compile(r"[^\w\s]+")


def dup_line_fraction(text: str) -> float:
    """Characters in lines that occur more than once / characters in non-empty lines."""
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    if len(lines) < 2:
        return 0.0
    counts = Counter(lines)
    total = sum(len(ln) for ln in lines)
    dup = sum(len(ln) for ln in lines if counts[ln] > 1)
    return dup / total if total else 0.0


def top_ngram_fraction(text: str, n: int, words: list[str] | None = None) -> float:
    """Characters covered by all occurrences of the most frequent word n-gram / characters in words
    (the Gopher repetition measure). 0 when no n-gram occurs twice. `words`: text.split(), if already made."""
    return _top_gram_fraction(text.split() if words is None else words, len, n)


def unit_top_ngram_fraction(units: Sequence[str], length: dict[str, int], n: int) -> float:
    """`top_ngram_fraction` over units whose characters in the text are `length[unit]` (morphemes: their
    surface span, as "form/tag" units)."""
    return _top_gram_fraction(units, length.__getitem__, n)


def _top_gram_fraction(units: Sequence[str], size: Callable[[str], int], n: int) -> float:
    """Characters (`size` of a unit) covered by all occurrences of the most frequent unit n-gram / characters of
    all units; 0 when no n-gram occurs twice."""
    if len(units) < n + 1:
        return 0.0
    grams = Counter(zip(*(units[i:] for i in range(n))))
    gram, count = grams.most_common(1)[0]
    if count < 2:
        return 0.0
    total = sum(map(size, units))
    return min(1.0, count * sum(map(size, gram)) / total) if total else 0.0


_SENTENCE_BREAKS = re.compile(r"(?<=[.!?。？！…])\s+|\n+")


def sentence_count(text: str) -> int:
    """Sentences, split after . ! ? (and their full-width forms, …) followed by a space, and at line breaks."""
    text = text.strip()
    return len(_SENTENCE_BREAKS.findall(text)) + 1 if text else 0


@lru_cache(maxsize=1)
def kiwi():
    """One kiwipiepy analyser per process (loading its model takes seconds), single-threaded (prepare runs
    one per worker process), without the typo and multi-word dictionaries (faster to load)."""
    from kiwipiepy import Kiwi

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # num_workers=0: single-threaded since 0.21
        return Kiwi(num_workers=0, load_typo_dict=False, load_multi_dict=False)


def symbol_ratio(text: str, words: list[str] | None = None) -> float:
    """Punctuation and symbols / non-space characters. `words`: text.split(), if already made."""
    nonspace = sum(map(len, text.split() if words is None else words))  # str.split and \s agree on what whitespace is
    return sum(map(len, _SYMBOL_RUNS.findall(text))) / nonspace if nonspace else 0.0


def quality_features(text: str, ngram_size: int = 3, tokenizer: str = "whitespace") -> Features:
    if tokenizer == "kiwi":
        tokens = kiwi().tokenize(text)
        units = [f"{t.form}/{t.tag}" for t in tokens]
        length = {
            u: t.len for u, t in zip(units, tokens)
        }  # a morpheme's surface span (the same form, nearly always the same)
        pos = Counter(pos_class(t.tag) for t in tokens)
        return Features(
            words=len(text.split()),
            chars=len(text),
            hangul_ratio=hangul_ratio(text),
            dup_line_fraction=dup_line_fraction(text),
            top_ngram_fraction=unit_top_ngram_fraction(units, length, ngram_size),
            symbol_ratio=symbol_ratio(text),
            sentences=tokens[-1].sent_position + 1 if tokens else 0,
            morphemes=len(tokens),
            pos=tuple(pos[c] for c in POS_CLASSES),
        )
    words = text.split()
    return Features(
        words=len(words),
        chars=len(text),
        hangul_ratio=hangul_ratio(text),
        dup_line_fraction=dup_line_fraction(text),
        top_ngram_fraction=top_ngram_fraction(text, ngram_size, words),
        symbol_ratio=symbol_ratio(text, words),
        sentences=sentence_count(text),
    )


def quality_reason(f: Features, cfg: FilterConfig) -> str:
    """The first filter a text fails, as `filter:<name>`, or "" when it passes them all."""
    if f.chars < cfg.min_chars:
        return "filter:too_short"
    if f.chars > cfg.max_chars:
        return "filter:too_long"
    if cfg.min_hangul_ratio > 0 and f.hangul_ratio < cfg.min_hangul_ratio:
        return "filter:low_hangul_ratio"
    if f.words >= cfg.repetition_min_words and f.dup_line_fraction > cfg.max_dup_line_fraction:
        return "filter:repeated_lines"
    if f.words >= cfg.repetition_min_words and f.top_ngram_fraction > cfg.max_top_ngram_fraction:
        return "filter:repeated_ngrams"
    if f.symbol_ratio > cfg.max_symbol_ratio:
        return "filter:too_many_symbols"
    if f.sentences < cfg.min_sentences:
        return "filter:too_few_sentences"
    return ""


# Per-row counts `quality_batch` records for the stats and the report (0 on rejected rows).
TEXT_STAT_COLUMNS = ("_words", "_sentences", "_morphemes", *(f"_pos_{c}" for c in POS_CLASSES))


def quality_batch(batch: pd.DataFrame, kind: str, cfg: FilterConfig) -> pd.DataFrame:
    """Measure and filter a canonical batch. Adds `_chars`, `_hangul_ratio` and the TEXT_STAT_COLUMNS (for the
    stats and the report) and sets `_reject` on rows that fail a filter. Rows already rejected are left as they
    are. Pure."""
    out = batch.copy()
    chars = [0] * len(out)
    ratios = [0.0] * len(out)
    counts = np.zeros((len(out), len(TEXT_STAT_COLUMNS)), dtype=np.int64)
    reasons = out[REJECT].tolist()
    live = [i for i, r in enumerate(reasons) if not r]
    texts = filter_text(out.iloc[live], kind) if live else []
    for i, text in zip(live, texts):
        f = quality_features(text, cfg.ngram, cfg.tokenizer)
        chars[i], ratios[i] = f.chars, f.hangul_ratio
        counts[i, :3] = f.words, f.sentences, f.morphemes
        if f.pos:
            counts[i, 3:] = f.pos
        reasons[i] = quality_reason(f, cfg)
    out["_chars"] = chars
    out["_hangul_ratio"] = ratios
    for j, col in enumerate(TEXT_STAT_COLUMNS):
        out[col] = counts[:, j]
    out[REJECT] = reasons
    return out


def text_stats(counts: np.ndarray, tokenizer: str) -> dict[str, Any]:
    """Statistics of the kept rows' TEXT_STAT_COLUMNS (one row each) for stats.json: words and sentences per
    row, and with kiwi morphemes per row and per word and the share of each part of speech."""
    rows = len(counts)
    words, sentences, morphemes = (counts[:, j] if rows else np.zeros(0) for j in range(3))
    stats: dict[str, Any] = {
        "tokenizer": tokenizer,
        "words_mean": float(words.mean()) if rows else 0.0,
        "sentences_mean": float(sentences.mean()) if rows else 0.0,
        "sentences_p50": float(np.percentile(sentences, 50)) if rows else 0.0,
    }
    if tokenizer == "kiwi":
        total = int(morphemes.sum())
        pos = counts[:, 3:].sum(axis=0) if rows else np.zeros(len(POS_CLASSES))
        stats |= {
            "morphemes_mean": float(morphemes.mean()) if rows else 0.0,
            "morphemes_per_word": total / int(words.sum()) if rows and words.sum() else 0.0,
            "pos_fraction": {c: (float(n) / total if total else 0.0) for c, n in zip(POS_CLASSES, pos)},
        }
    return stats
