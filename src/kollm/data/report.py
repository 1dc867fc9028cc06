"""The HTML report of a prepare step: counts per filter and reason, length, Hangul-ratio and sentence
histograms (plain HTML bars, no external assets), morpheme statistics (tokenizer: kiwi), PII counts and masked
examples of removed rows."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kollm.data.validate import Counts


@dataclass
class ReportData:
    step: str
    kind: str
    counts: Counts
    pii_found: dict[str, int]
    chars: Sequence[int]  # lengths of kept rows
    hangul_ratios: Sequence[float]  # of kept rows
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> masked, truncated texts
    sources: dict[str, int] = field(default_factory=dict)  # source name -> rows read
    failed: list[str] = field(default_factory=list)  # gate violations, when the gate failed
    sentences: Sequence[int] = ()  # sentences per kept row
    morphemes: Sequence[int] = ()  # morphemes per kept row (tokenizer: kiwi; else empty)
    text_stats: dict[str, Any] = field(default_factory=dict)  # kollm.data.filters.text_stats
    expectations: list[tuple[str, bool, list[str]]] = field(default_factory=list)  # GX: (split, success, failures)


def length_histogram(chars: Sequence[int]) -> list[tuple[str, int]]:
    """Counts in power-of-two length bins: [1, 2), [2, 4), ... up to the longest."""
    if not chars:
        return []
    top = max(1, max(chars))
    bins = [0] * (int(math.log2(top)) + 1)
    for c in chars:
        bins[int(math.log2(c)) if c > 0 else 0] += 1
    first = next(i for i, n in enumerate(bins) if n)
    return [(f"{2**i:,}–{2 ** (i + 1) - 1:,}", n) for i, n in enumerate(bins) if i >= first]


def ratio_histogram(values: Sequence[float], bins: int = 10) -> list[tuple[str, int]]:
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int(v * bins))] += 1
    return [(f"{i / bins:.1f}–{(i + 1) / bins:.1f}", n) for i, n in enumerate(counts)]


def _bars(rows: Sequence[tuple[str, int]], total: int | None = None) -> str:
    if not rows:
        return "<p class=muted>no rows</p>"
    top = max(n for _, n in rows) or 1
    total = total if total is not None else sum(n for _, n in rows)
    out = ["<table class=bars>"]
    for label, n in rows:
        pct = f"{n / total:.1%}" if total else ""
        out.append(
            f"<tr><td class=label>{html.escape(label)}</td><td class=num>{n:,}</td><td class=num>{pct}</td>"
            f"<td class=barcell><div class=bar style='width:{100 * n / top:.1f}%'></div></td></tr>"
        )
    out.append("</table>")
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,-apple-system,'Noto Sans KR','Malgun Gothic',sans-serif;margin:2em;max-width:1100px;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{padding:2px 8px;text-align:left}.num{text-align:right;font-variant-numeric:tabular-nums}
.bars{width:100%}.barcell{width:60%}.bar{background:#4a7bd0;height:12px;border-radius:2px}
.label{white-space:nowrap}.muted{color:#888}.fail{color:#b00;font-weight:bold}
pre{white-space:pre-wrap;background:#f6f6f6;padding:6px;border-radius:4px;font-size:.9em;margin:4px 0}
"""


def _text_section(data: ReportData) -> str:
    """Sentences per row, and with kiwi morphemes per row and the parts of speech."""
    ts = data.text_stats
    out = [
        f"<h2>Sentences per kept row <span class=muted>(tokenizer: {html.escape(str(ts.get('tokenizer', 'whitespace')))})</span></h2>"
    ]
    if ts:
        rows = [
            ("words per row (mean)", ts.get("words_mean", 0.0)),
            ("sentences per row (mean)", ts.get("sentences_mean", 0.0)),
        ]
        if "morphemes_mean" in ts:
            rows += [
                ("morphemes per row (mean)", ts["morphemes_mean"]),
                ("morphemes per word", ts["morphemes_per_word"]),
            ]
        out.append(
            "<table>"
            + "".join(f"<tr><th>{html.escape(k)}</th><td class=num>{v:,.2f}</td></tr>" for k, v in rows)
            + "</table>"
        )
    out.append(_bars(length_histogram(data.sentences)))
    if data.morphemes:
        out.append("<h2>Morphemes per kept row (kiwi)</h2>" + _bars(length_histogram(data.morphemes)))
        pos = ts.get("pos_fraction", {})
        total = sum(data.morphemes)
        out.append(
            "<h2>Parts of speech of the morphemes (kiwi)</h2>"
            + _bars([(k, round(v * total)) for k, v in pos.items()], total)
        )
    return "\n".join(out)


def render(data: ReportData) -> str:
    c = data.counts
    parts = [
        "<!doctype html><html lang=ko><head><meta charset=utf-8>",
        f"<title>kollm prepare: {html.escape(data.step)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Data preparation report: {html.escape(data.step)} <span class=muted>({html.escape(data.kind)})</span></h1>",
    ]
    if data.failed:
        parts.append(
            "<p class=fail>The validation gate failed:</p><ul>"
            + "".join(f"<li>{html.escape(f)}</li>" for f in data.failed)
            + "</ul>"
        )
    if data.expectations:
        parts.append("<h2>Great Expectations</h2><table><tr><th>split</th><th>result</th></tr>")
        for split, ok, failures in data.expectations:
            verdict = (
                "passed" if ok else "failed:<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in failures) + "</ul>"
            )
            parts.append(f"<tr><th>{html.escape(split)}</th><td>{verdict}</td></tr>")
        parts.append("</table>")
    parts.append(
        "<table>"
        f"<tr><th>rows read</th><td class=num>{c.total:,}</td></tr>"
        f"<tr><th>kept</th><td class=num>{c.kept:,}</td></tr>"
        f"<tr><th>train</th><td class=num>{c.train:,}</td></tr>"
        f"<tr><th>eval</th><td class=num>{c.eval:,}</td></tr>"
        f"<tr><th>rejected</th><td class=num>{c.rejected:,}</td></tr></table>"
    )
    if data.sources:
        parts.append("<h2>Rows per source</h2>" + _bars(sorted(data.sources.items())))
    stages: dict[str, int] = {}
    for reason, n in c.reasons.items():
        stages[reason.split(":", 1)[0]] = stages.get(reason.split(":", 1)[0], 0) + n
    parts.append("<h2>Rejected rows per stage</h2>" + _bars(sorted(stages.items(), key=lambda kv: -kv[1]), c.total))
    parts.append("<h2>Rejected rows per reason</h2>" + _bars(sorted(c.reasons.items(), key=lambda kv: -kv[1]), c.total))
    parts.append("<h2>PII values found</h2>" + _bars(sorted(data.pii_found.items())))
    parts.append("<h2>Length of kept rows (characters)</h2>" + _bars(length_histogram(data.chars)))
    parts.append("<h2>Hangul ratio of kept rows (Hangul / letters)</h2>" + _bars(ratio_histogram(data.hangul_ratios)))
    parts.append(_text_section(data))
    parts.append("<h2>Examples of removed rows <span class=muted>(PII masked, truncated)</span></h2>")
    if not data.examples:
        parts.append("<p class=muted>no rows were removed</p>")
    for reason, texts in sorted(data.examples.items()):
        parts.append(f"<h3>{html.escape(reason)}</h3>" + "".join(f"<pre>{html.escape(t)}</pre>" for t in texts))
    parts.append("</body></html>")
    return "\n".join(parts)
