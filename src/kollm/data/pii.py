"""Korean PII detection and masking with typed placeholders.

Types and how each is recognised (digits inside words are matched with digit look-arounds, not `\\b`,
because Korean particles stick to numbers: "010-1234-5678로 연락"):

- `RRN`: 주민등록번호 and 외국인등록번호, YYMMDD-GNNNNNN with a valid date and a valid check digit
  (weights 2..9,2..5; residents: (11 - s % 11) % 10, foreigners (G = 5..8): (13 - s % 11) % 10).
  A number with a bad check digit is left alone.
- `PHONE`: mobile (010, 011, 016-019), Seoul 02, area codes 031-064, 070 internet phones, 050x, with
  `-`, `.`, ` ` or no separator, and +82 forms.
- `EMAIL`: local@domain.tld (the TLD is ASCII letters, so a following particle "...com으로" is not eaten).
- `CARD`: 13-19 digits (in groups of 4, or 4-6-5 for Amex) that pass the Luhn check.
- `ACCOUNT`: bank account numbers: 10-14 digits, bare or in 3-4 hyphenated groups, within a few words after
  계좌/통장/입금/송금/이체/예금주, a word ending in 은행/뱅크 (우리은행, KB국민은행, 카카오뱅크, ...) or an unambiguous
  bank name (신한, 농협, 우체국, ...); without such a word, only hyphenated groups in the shape a bank uses
  (신한 3-3-6, 우리 4-3-6, 국민 6-2-6, ...). 우리/하나/국민/기업 alone are ordinary words, and other hyphenated
  numbers (사업자등록번호 3-2-5, 법률 제12345-678-901호, 특허 10-2020-0012345) are not accounts.

Each type's action is configurable: `mask` (replace with `<TYPE>`), `drop` (reject the row, reason `pii:<type>`)
or `keep`. Masking is a pure function over strings and pandas batches.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import date

import pandas as pd

from kollm.data.config import PII_TYPES, PiiConfig
from kollm.data.schema import REJECT, map_texts_indexed

_EMAIL = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,24}",
    re.ASCII,
)
_RRN = re.compile(
    r"(?<!\d)(\d{2})(\d{2})(\d{2})[ ]?[-–][ ]?([1-8])(\d{6})(?!\d)|(?<![\d-])(\d{2})(\d{2})(\d{2})([1-8])(\d{6})(?![\d-])"
)
_CARD = re.compile(r"(?<![\d-])(?:\d{4}[- ]\d{4}[- ]\d{4}[- ]\d{1,7}|\d{4}[- ]\d{6}[- ]\d{5}|\d{13,19})(?![\d-])")
_PHONE = re.compile(
    r"(?<![\d-])(?:"
    r"(?:\+82[- .]?|\(\+82\)[- .]?)(?:0?1[016789]|0?2|0?[3-6][1-5]|0?70)[- .)]?\d{3,4}[- .]?\d{4}"  # +82 forms
    r"|\(?0(?:1[016789]|2|[3-6][1-5]|70|50[2-8])\)?[- .]?\d{3,4}[- .]\d{4}"  # with a separator
    r"|0(?:1[016789])\d{7,8}"  # mobile without separators
    r")(?![\d-])"
)
_ACCOUNT_NUMBER = r"\d{10,14}|\d{2,6}-\d{2,6}-\d{2,7}(?:-\d{1,3})?"
_ACCOUNT_HYPHEN = re.compile(r"(?<![\d-])\d{2,6}-\d{2,6}-\d{2,7}(?:-\d{1,3})?(?![\d-])")
_ACCOUNT_CONTEXT = re.compile(
    r"(?:계좌|통장|입금|송금|이체|예금주|은행|뱅크|신한|농협|우체국|새마을금고|신협|수협|씨티|KB국민|IBK|SC제일)"
    rf"[^\d\n]{{0,15}}(?<![\d-])({_ACCOUNT_NUMBER})(?![\d-])"
)
# Group lengths of account numbers as the major banks print them (no context word needed for these).
_BANK_SHAPES = {
    (6, 2, 6),
    (3, 2, 4, 3),
    (3, 3, 6),
    (3, 2, 6),
    (4, 3, 6),
    (3, 6, 5),
    (3, 4, 4, 2),
    (3, 6, 2, 3),
    (4, 2, 7),
    (4, 2, 7, 1),
    (4, 4, 4),
    (3, 6, 3),
    (3, 2, 6, 1),
    (3, 3, 6, 1),
}


_MAYBE_PII = re.compile(r"@|\d[\d \t.\-–()]{7,}\d|\d{9}")


def rrn_valid(digits: str) -> bool:
    """13 digits of a 주민등록번호 / 외국인등록번호: a real birth date and a valid check digit."""
    if len(digits) != 13 or not digits.isdigit():
        return False
    yy, mm, dd, g = int(digits[:2]), int(digits[2:4]), int(digits[4:6]), int(digits[6])
    century = {1: 1900, 2: 1900, 5: 1900, 6: 1900, 3: 2000, 4: 2000, 7: 2000, 8: 2000}.get(g)
    if century is None:
        return False
    try:
        date(century + yy, mm, dd)
    except ValueError:
        return False
    s = sum(int(d) * w for d, w in zip(digits[:12], (2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5)))
    check = (11 - s % 11) % 10 if g <= 4 else (13 - s % 11) % 10
    return check == int(digits[12])


def luhn_valid(digits: str) -> bool:
    if not digits.isdigit() or not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _digits(s: str) -> str:
    return "".join(ch for ch in s if ch.isdigit())


@dataclass
class PiiScan:
    """Masked text and what was found, per type."""

    text: str
    found: Counter[str] = field(default_factory=Counter)


def _replace(
    pattern: re.Pattern[str],
    text: str,
    kind: str,
    valid,
    found: Counter[str],
    mask: bool,
    kept: list[str],
    group: int = 0,
) -> str:
    """Replace each valid match: with `<KIND>` when masking, else with a digit-free sentinel (restored at the end)
    so that a kept phone number is not found again as an account number."""

    def sub(m: re.Match[str]) -> str:
        if valid is not None and not valid(m):
            return m.group(0)
        found[kind] += 1
        start, end = m.span(group)
        value = m.string[start:end]
        if mask:
            replacement = f"<{kind.upper()}>"
        else:
            replacement = f"\ue000{chr(0xF0000 + len(kept))}\ue001"
            kept.append(value)
        return m.group(0)[: start - m.start()] + replacement + m.group(0)[end - m.start() :]

    return pattern.sub(sub, text)


_SENTINEL = re.compile("\ue000(.)\ue001", re.DOTALL)


def scan_text(text: str, mask: frozenset[str] = frozenset(PII_TYPES)) -> PiiScan:
    """Find PII of every type in `text`; replace those in `mask` with `<TYPE>` placeholders.

    Types are scanned in a fixed order (e-mail, RRN, card, phone, account) and a found value is out of the
    way before the next type looks, so one value is counted once. A detected value that is not masked is
    still counted and left as it was.
    """
    found: Counter[str] = Counter()
    if not _MAYBE_PII.search(text):  # every type needs an "@" or 9+ digits close together
        return PiiScan(text, found)
    kept: list[str] = []
    if "@" in text:
        text = _replace(_EMAIL, text, "email", None, found, "email" in mask, kept)
    text = _replace(_RRN, text, "rrn", lambda m: rrn_valid(_digits(m.group(0))), found, "rrn" in mask, kept)
    text = _replace(_CARD, text, "card", lambda m: luhn_valid(_digits(m.group(0))), found, "card" in mask, kept)
    text = _replace(_PHONE, text, "phone", None, found, "phone" in mask, kept)
    account_len = lambda m: 10 <= len(_digits(m.group(1))) <= 14  # noqa: E731
    text = _replace(_ACCOUNT_CONTEXT, text, "account", account_len, found, "account" in mask, kept, group=1)
    bank_shape = lambda m: tuple(map(len, m.group(0).split("-"))) in _BANK_SHAPES  # noqa: E731
    text = _replace(_ACCOUNT_HYPHEN, text, "account", bank_shape, found, "account" in mask, kept)
    if kept:
        text = _SENTINEL.sub(
            lambda m: kept[i] if 0 <= (i := ord(m.group(1)) - 0xF0000) < len(kept) else m.group(0), text
        )
    return PiiScan(text, found)


def mask_text(text: str) -> str:
    """Mask every PII type. Convenience for reports and tests."""
    return scan_text(text).text


# --- batches --------------------------------------------------------------------------------------


def pii_batch(batch: pd.DataFrame, kind: str, cfg: PiiConfig, per_row: bool = False):
    """Scan every text of a canonical batch: mask what `cfg` masks, reject rows (reason `pii:<type>`) holding a
    type whose action is `drop`. Returns the new batch and how many values of each type were found (in all,
    or per row with `per_row=True`). Pure."""
    actions = cfg.actions()
    mask = frozenset(t for t, a in actions.items() if a == "mask")
    drop = [t for t in PII_TYPES if actions[t] == "drop"]
    found: Counter[str] = Counter()
    per_row_found: list[Counter[str]] = [Counter() for _ in range(len(batch))]

    def scan(i: int, text: str) -> str:
        result = scan_text(text, mask=mask)
        per_row_found[i].update(result.found)
        return result.text

    out = map_texts_indexed(batch, kind, scan)
    reasons = out[REJECT].tolist()
    for i, row_found in enumerate(per_row_found):
        found.update(row_found)
        dropped = next((t for t in drop if row_found[t]), None)
        if dropped and not reasons[i]:
            reasons[i] = f"pii:{dropped}"
    out[REJECT] = reasons
    return (out, per_row_found) if per_row else (out, found)
