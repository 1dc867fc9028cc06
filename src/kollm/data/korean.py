"""Korean text normalization: pure functions over strings (the prepare step maps them over batches).

What `normalize_text` does, in this order (the order makes it idempotent):

1. Line breaks: CRLF, CR, U+2028/U+2029 and other line separators become "\\n".
2. Invisible characters are removed: control characters (except tab and newline), zero-width and other
   format characters (ZWSP, BOM, soft hyphen, direction marks, ...) and Hangul fillers. A zero-width joiner
   between two emoji is kept, so emoji ZWJ sequences (👩‍💻) keep their meaning.
3. Full-width ASCII (ＡＢＣ１２３！) becomes ASCII, half-width Hangul letters become the usual letters, and
   unusual spaces (NBSP, ideographic space, en/em/thin spaces) become a plain space.
4. Unicode NFC: decomposed syllables (macOS file names, NFD text) and conjoining jamo sequences are
   composed into precomposed syllables (ᄒ+ᅡ+ᆫ -> 한).
5. Conjoining jamo left over that form no syllable are written as compatibility jamo (ᄏᄏ -> ㅋㅋ).
6. Whitespace: runs of spaces and tabs inside a line become one space, trailing spaces and tabs of each
   line are removed, three or more line breaks become a blank line, and the text is stripped. A line's
   leading indentation is kept (code in SFT answers keeps its meaning), and inside a fenced code block
   (a line starting with ```) spaces within a line are kept too (aligned code and tables).

Punctuation, symbols, emoji, Hanja and every letter are kept: normalization never deletes meaning.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

import numpy as np

# --- character tables, built once from the Unicode database ---------------------------------------


def _conjoining_to_compat() -> dict[int, str]:
    """Conjoining jamo (U+1100-U+11FF) -> compatibility jamo (U+3131-U+318E), matched by Unicode name."""
    compat = {}
    for cp in range(0x3131, 0x318F):
        name = unicodedata.name(chr(cp), "")
        if name.startswith("HANGUL LETTER "):
            compat[name.removeprefix("HANGUL LETTER ")] = chr(cp)
    table = {}
    for cp in range(0x1100, 0x1200):
        name = unicodedata.name(chr(cp), "")
        for prefix in ("HANGUL CHOSEONG ", "HANGUL JUNGSEONG ", "HANGUL JONGSEONG "):
            if name.startswith(prefix) and name.removeprefix(prefix) in compat:
                table[cp] = compat[name.removeprefix(prefix)]
    return table


_JAMO_TO_COMPAT = _conjoining_to_compat()
_HANGUL_FILLERS = (0x115F, 0x1160, 0x3164, 0xFFA0)
_ZWJ = "\u200d"


def _width_table() -> dict[int, str]:
    """Full-width ASCII -> ASCII, half-width Hangul -> compatibility jamo, other half/full-width forms -> NFKC."""
    table: dict[int, str] = {}
    for cp in range(0xFF01, 0xFFEF):
        c = chr(cp)
        if unicodedata.category(c) == "Cn" or cp in _HANGUL_FILLERS:
            continue
        mapped = unicodedata.normalize("NFKC", c)
        if len(mapped) == 1 and ord(mapped) in _JAMO_TO_COMPAT:
            mapped = _JAMO_TO_COMPAT[ord(mapped)]
        if mapped != c:
            table[cp] = mapped
    return table


def _space_and_line_table() -> dict[int, str | None]:
    table: dict[int, str | None] = {}
    for cp in (0x00A0, 0x1680, *range(0x2000, 0x200B), 0x202F, 0x205F, 0x3000, 0x000B, 0x000C):
        table[cp] = " "
    for cp in (0x0085, 0x2028, 0x2029):
        table[cp] = "\n"
    return table


def _invisible() -> dict[int, None]:
    """Control (Cc) and format (Cf) characters and Hangul fillers, minus tab, newline and ZWJ (handled apart)."""
    table: dict[int, None] = {}
    for cp in (*range(0x20000), *range(0xE0000, 0xE1000)):
        if cp in (0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x0085, 0x200D):
            continue
        cat = unicodedata.category(chr(cp))
        if cat == "Cc" or (cat == "Cf" and not 0xE0000 <= cp <= 0xE007F) or cp in _HANGUL_FILLERS:
            table[cp] = None
    # Tag characters (U+E0020-E007F) are part of emoji flag sequences (🏴 subdivision flags); keep them.
    return table


_TRANSLATE: dict[int, str | None] = {**_invisible(), **_width_table(), **_space_and_line_table()}
_COMPAT_TRANSLATE = {cp: c for cp, c in _JAMO_TO_COMPAT.items()}


def _char_class(cps: list[int]) -> re.Pattern[str]:
    """A regex character class matching exactly these code points (as ranges)."""
    parts, cps = [], sorted(cps)
    start = prev = cps[0]
    for cp in [*cps[1:], None]:
        if cp is not None and cp == prev + 1:
            prev = cp
            continue
        parts.append(re.escape(chr(start)) + ("-" + re.escape(chr(prev)) if prev > start else ""))
        if cp is not None:
            start = prev = cp
    return re.compile("[" + "".join(parts) + "]")


_NEEDS_TRANSLATE = _char_class(list(_TRANSLATE))  # most texts need no translation: test first (much faster)

_CRLF = re.compile(r"\r\n?")
_ZWJ_NOT_EMOJI = re.compile(
    r"(?<![\U0001F000-\U0001FAFF\u2600-\u27BF\uFE0F\U0001F3FB-\U0001F3FF])\u200d|\u200d(?![\U0001F000-\U0001FAFF\u2600-\u27BF])"
)
_INNER_SPACES = re.compile(r"(?<=[^ \t\n])(?:[ \t]{2,}|\t)")  # not at a line start: indentation is kept
_TRAILING_SPACES = re.compile(r"[ \t]+$", re.MULTILINE)
_FENCE = "```"
_MANY_NEWLINES = re.compile(r"\n{3,}")
_CONJOINING = re.compile(r"[\u1100-\u11FF]")


def normalize_text(text: str) -> str:
    """Normalize one Korean text (see the module docstring). Idempotent; never deletes a Hangul syllable."""
    if "\r" in text:
        text = _CRLF.sub("\n", text)
    if _ZWJ in text:
        text = _ZWJ_NOT_EMOJI.sub("", text)
    if _NEEDS_TRANSLATE.search(text):
        text = text.translate(_TRANSLATE)
    text = unicodedata.normalize("NFC", text)
    if _CONJOINING.search(text):
        text = text.translate(_COMPAT_TRANSLATE)
    text = _spaces(text)
    if "\n\n\n" in text:
        text = _MANY_NEWLINES.sub("\n\n", text)
    return text.strip()


def _spaces(text: str) -> str:
    """Collapse spaces inside lines and drop trailing ones; keep indentation, and fenced code as it is."""
    if "\t" not in text and "  " not in text and " \n" not in text and not text.endswith(" "):
        return text  # nothing either pattern matches (most texts): no regex scans
    if _FENCE not in text:
        return _INNER_SPACES.sub(" ", _TRAILING_SPACES.sub("", text))
    lines, fenced = [], False
    for line in text.split("\n"):
        line = line.rstrip(" \t")
        is_fence = line.lstrip(" \t").startswith(_FENCE)
        lines.append(line if fenced and not is_fence else _INNER_SPACES.sub(" ", line))
        fenced ^= is_fence
    return "\n".join(lines)


# --- measurements ---------------------------------------------------------------------------------

_NOT_HANGUL = re.compile(r"[^\uAC00-\uD7A3\u1100-\u11FF\u3131-\u318E\uA960-\uA97F\uD7B0-\uD7FF]+")
_NOT_LETTER = re.compile(r"[\W\d_]+")


def hangul_ratio(text: str) -> float:
    """Hangul characters / letters (digits, spaces and punctuation do not count). 0 for a text without letters.

    Both are properties of single code points, so they are looked up per code point in two tables made once
    per process by running the same character classes (_NOT_LETTER, _NOT_HANGUL) over every code point: the
    same result as deleting with the regexes, several times faster on the prepare hot path."""
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    if len(cps) and cps.max() >= _TABLE_SIZE:  # beyond the Basic Multilingual Plane (emoji, rare CJK): the regexes
        letters_text = _NOT_LETTER.sub("", text)
        return len(_NOT_HANGUL.sub("", letters_text)) / len(letters_text) if letters_text else 0.0
    is_letter, is_hangul = _letter_tables()
    letters = int(np.count_nonzero(is_letter[cps]))
    return int(np.count_nonzero(is_hangul[cps])) / letters if letters else 0.0


_TABLE_SIZE = 0x10000


@lru_cache(maxsize=1)
def _letter_tables() -> tuple[np.ndarray, np.ndarray]:
    """Per code point of the Basic Multilingual Plane: a letter (not matched by _NOT_LETTER), and a Hangul letter
    (not matched by _NOT_HANGUL either)."""
    every = "".join(map(chr, range(_TABLE_SIZE)))
    is_letter = np.ones(_TABLE_SIZE, dtype=bool)
    for m in _NOT_LETTER.finditer(every):
        is_letter[m.start() : m.end()] = False
    is_hangul = is_letter.copy()
    for m in _NOT_HANGUL.finditer(every):
        is_hangul[m.start() : m.end()] = False
    return is_letter, is_hangul
