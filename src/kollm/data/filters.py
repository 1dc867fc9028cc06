"""Quality filters: length, Hangul ratio, repetition (duplicate lines, repeated n-grams) and symbol ratio.

`quality_features` measures a text; `quality_reason` turns measurements into a rejection reason (or "");
`quality_batch` does both over a canonical pandas batch and records the features for the report.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import pandas as pd
from pydantic import BaseModel, Field, model_validator

from kollm.data.korean import hangul_ratio
from kollm.data.schema import REJECT, filter_text
from kollm.pipeline.step import STRICT


class FilterConfig(BaseModel):
    model_config = STRICT
    min_chars: int = Field(20, ge=0, description="Reject texts shorter than this many characters (after normalization).")
    max_chars: int = Field(200_000, ge=1, description="Reject texts longer than this many characters.")
    min_hangul_ratio: float = Field(
        0.3, ge=0, le=1, description="Reject texts whose letters are less than this fraction Hangul (0 turns the filter off)."
    )
    max_dup_line_fraction: float = Field(
        0.3, ge=0, le=1, description="Reject texts where more than this fraction of the characters sit in lines repeated elsewhere in the text."
    )
    ngram_size: int = Field(3, ge=1, le=20, description="Word n-gram size for the repetition check.")
    max_top_ngram_fraction: float = Field(
        0.2, ge=0, le=1, description="Reject texts where the most frequent word n-gram covers more than this fraction of the characters."
    )
    repetition_min_words: int = Field(
        30, ge=0, description="Apply the two repetition checks only to texts with at least this many words (short Q&A repeats the question by nature)."
    )
    max_symbol_ratio: float = Field(
        0.3, ge=0, le=1, description="Reject texts where more than this fraction of non-space characters are symbols or punctuation."
    )

    @model_validator(mode="after")
    def _range(self) -> FilterConfig:
        if self.max_chars <= self.min_chars:
            raise ValueError(f"max_chars ({self.max_chars}) must be greater than min_chars ({self.min_chars})")
        return self


@dataclass(frozen=True)
class Features:
    chars: int
    hangul_ratio: float
    dup_line_fraction: float
    top_ngram_fraction: float
    symbol_ratio: float
    words: int = 0


_SPACE_RUNS = re.compile(r"\s+")
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


def top_ngram_fraction(text: str, n: int) -> float:
    """Characters covered by all occurrences of the most frequent word n-gram / characters in words
    (the Gopher repetition measure). 0 when no n-gram occurs twice."""
    words = text.split()
    if len(words) < n + 1:
        return 0.0
    grams = Counter(zip(*(words[i:] for i in range(n))))
    gram, count = grams.most_common(1)[0]
    if count < 2:
        return 0.0
    total = sum(map(len, words))
    return min(1.0, count * sum(map(len, gram)) / total) if total else 0.0


def symbol_ratio(text: str) -> float:
    """Punctuation and symbols / non-space characters."""
    nonspace = len(text) - sum(map(len, _SPACE_RUNS.findall(text)))
    return sum(map(len, _SYMBOL_RUNS.findall(text))) / nonspace if nonspace else 0.0


def quality_features(text: str, ngram_size: int = 3) -> Features:
    return Features(
        words=len(text.split()),
        chars=len(text),
        hangul_ratio=hangul_ratio(text),
        dup_line_fraction=dup_line_fraction(text),
        top_ngram_fraction=top_ngram_fraction(text, ngram_size),
        symbol_ratio=symbol_ratio(text),
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
    return ""


def quality_batch(batch: pd.DataFrame, kind: str, cfg: FilterConfig) -> pd.DataFrame:
    """Measure and filter a canonical batch. Adds `_chars` and `_hangul_ratio` (for the report) and sets
    `_reject` on rows that fail a filter. Rows already rejected are left as they are. Pure."""
    out = batch.copy()
    chars = [0] * len(out)
    ratios = [0.0] * len(out)
    reasons = out[REJECT].tolist()
    live = [i for i, r in enumerate(reasons) if not r]
    texts = filter_text(out.iloc[live], kind) if live else []
    for i, text in zip(live, texts):
        f = quality_features(text, cfg.ngram_size)
        chars[i], ratios[i] = f.chars, f.hangul_ratio
        reasons[i] = quality_reason(f, cfg)
    out["_chars"] = chars
    out["_hangul_ratio"] = ratios
    out[REJECT] = reasons
    return out
