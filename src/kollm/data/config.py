"""The `prepare` step's settings for each stage (dedup, filters, pii, txt reading), without the stages' code.

A pipeline is planned (and a cached step reused) from these models alone; the stages themselves import numpy and
pandas, which take seconds, so their modules (dedup.py, filters.py, pii.py, readers.py) load only when a step
prepares data. Those modules re-export the models below under their old names.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from kollm._pydantic import STRICT

PII_TYPES = ("rrn", "phone", "email", "card", "account")
TxtMode = Literal["file", "paragraph"]


class DedupConfig(BaseModel):
    model_config = STRICT
    exact: bool = Field(
        True, description="Drop rows whose normalized text equals an earlier row's (reason dedup:exact)."
    )
    near: bool = Field(True, description="Drop rows that are near-duplicates of an earlier row (reason dedup:near).")
    threshold: float = Field(
        0.8,
        gt=0,
        lt=1,
        description="Jaccard similarity of shingles above which two rows are near-duplicates (long rows; see short_doc_slack).",
    )
    transliteration: bool = Field(
        True,
        description="Compare texts in a romanized, sound-folded form, so a loanword in Hangul and in Latin letters "
        "(데비안 / Debian) counts as the same word. false: compare Hangul as it is.",
    )
    short_doc_slack: int = Field(
        4,
        ge=0,
        le=1000,
        description="Shingles that may differ on each side however short the text: a pair with n shingles "
        "needs Jaccard >= min(threshold, (n - slack) / (n + slack)) (one changed word in a short paragraph). 0: `threshold` for all.",
    )
    min_threshold: float = Field(
        0.5, gt=0, lt=1, description="The lowest threshold `short_doc_slack` may lower a pair's threshold to."
    )
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (more: more accurate, slower).")
    shingle_size: int | None = Field(
        None,
        ge=1,
        le=32,
        description="Shingle size (letters and digits only; spaces and punctuation ignored). Default: 3 sound "
        "units (about a syllable each) with transliteration, 5 characters without.",
    )
    seed: int = Field(1, description="MinHash seed.")

    @model_validator(mode="after")
    def _thresholds(self) -> DedupConfig:
        if self.min_threshold > self.threshold:
            raise ValueError(f"min_threshold ({self.min_threshold}) must not be above threshold ({self.threshold})")
        return self

    @property
    def shingle_chars(self) -> int:
        return self.shingle_size or (3 if self.transliteration else 5)


class FilterConfig(BaseModel):
    model_config = STRICT
    min_chars: int = Field(
        20, ge=0, description="Reject texts shorter than this many characters (after normalization)."
    )
    max_chars: int = Field(200_000, ge=1, description="Reject texts longer than this many characters.")
    min_hangul_ratio: float = Field(
        0.3,
        ge=0,
        le=1,
        description="Reject texts whose letters are less than this fraction Hangul (0 turns the filter off).",
    )
    max_dup_line_fraction: float = Field(
        0.3,
        ge=0,
        le=1,
        description="Reject texts where more than this fraction of the characters sit in lines repeated elsewhere in the text.",
    )
    tokenizer: Literal["whitespace", "kiwi"] = Field(
        "whitespace",
        description="Units of the repetition check and the text statistics: whitespace words, or morphemes "
        "from kiwipiepy's Korean analyser (`kiwi`: measures Korean whatever its spacing; much slower).",
    )
    ngram_size: int | None = Field(
        None,
        ge=1,
        le=20,
        description="N-gram size of the repetition check. Default: 3 words, or 5 morphemes with tokenizer: kiwi "
        "(a Korean word is two to three morphemes; on kolaw, 5-morpheme and 3-word repetition measure alike).",
    )
    max_top_ngram_fraction: float = Field(
        0.2,
        ge=0,
        le=1,
        description="Reject texts where the most frequent word (or morpheme) n-gram covers more than this fraction of the characters.",
    )
    min_sentences: int = Field(
        0,
        ge=0,
        description="Reject texts with fewer sentences than this (kiwi's sentences with tokenizer: kiwi, else split after . ! ? and "
        "at line breaks). 0: off.",
    )
    repetition_min_words: int = Field(
        30,
        ge=0,
        description="Apply the two repetition checks only to texts with at least this many words (short Q&A repeats the question by nature).",
    )
    max_symbol_ratio: float = Field(
        0.3,
        ge=0,
        le=1,
        description="Reject texts where more than this fraction of non-space characters are symbols or punctuation.",
    )

    @model_validator(mode="after")
    def _range(self) -> FilterConfig:
        if self.max_chars <= self.min_chars:
            raise ValueError(f"max_chars ({self.max_chars}) must be greater than min_chars ({self.min_chars})")
        return self

    @property
    def ngram(self) -> int:
        return self.ngram_size or (5 if self.tokenizer == "kiwi" else 3)

    @field_validator("tokenizer")
    @classmethod
    def _installed(cls, v: str) -> str:
        if v == "kiwi" and importlib.util.find_spec("kiwipiepy") is None:
            raise ValueError(
                "tokenizer: kiwi needs kiwipiepy; install it with `pip install 'kollm[kiwi]'` or use tokenizer: whitespace"
            )
        return v


Action = Literal["mask", "drop", "keep"]


class PiiConfig(BaseModel):
    model_config = STRICT
    rrn: Action = Field("mask", description="주민등록번호/외국인등록번호: mask (<RRN>), drop the row, or keep.")
    phone: Action = Field("mask", description="Phone numbers: mask (<PHONE>), drop the row, or keep.")
    email: Action = Field("mask", description="E-mail addresses: mask (<EMAIL>), drop the row, or keep.")
    card: Action = Field("mask", description="Card numbers (Luhn-valid): mask (<CARD>), drop the row, or keep.")
    account: Action = Field("mask", description="Bank account numbers: mask (<ACCOUNT>), drop the row, or keep.")

    def actions(self) -> dict[str, str]:
        return {t: getattr(self, t) for t in PII_TYPES}


def check_encoding(encoding: str) -> str:
    """A codec name Python knows whose line breaks are a single "\\n" byte (UTF-8, CP949, EUC-KR, ...)."""
    import codecs

    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ValueError(f"unknown encoding '{encoding}' (e.g. utf-8, cp949, euc-kr)") from None
    if "\n".encode(encoding) != b"\n":
        raise ValueError(
            f"'{encoding}' is not ASCII-compatible; convert the files to UTF-8 first (iconv -f {encoding} -t utf-8)"
        )
    return encoding
