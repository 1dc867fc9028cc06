"""Inline SVG for the pages: the step graph of a run and line charts of training loss. Both scale to the
screen (viewBox), so they work on a phone as on a desktop."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

from kollm.eval.report import Curve

COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"]
STATUS_FILL = {
    "FINISHED": "#e7f6eb",
    "RUNNING": "#e0ecff",
    "FAILED": "#fbe9e7",
    "KILLED": "#fbe9e7",
    "PENDING": "#f1f2f5",
    "DATA": "#fff8e1",
}
STATUS_STROKE = {
    "FINISHED": "#2f8f4e",
    "RUNNING": "#2563eb",
    "FAILED": "#b3261e",
    "KILLED": "#b3261e",
    "PENDING": "#9aa1ad",
    "DATA": "#b08900",
}


def _e(x: object) -> str:
    return html.escape(str(x))


@dataclass
class Node:
    id: str
    lines: list[str]  # first line bold
    status: str  # a key of STATUS_FILL
    href: str | None = None
    title: str = ""


def dag(nodes: Sequence[Node], edges: Sequence[tuple[str, str]], *, label: str = "step graph") -> str:
    """Nodes in columns by their longest path from a source, left to right; edges as curves."""
    ids = {n.id for n in nodes}
    edges = [(a, b) for a, b in edges if a in ids and b in ids and a != b]
    level = {n.id: 0 for n in nodes}
    for _ in range(len(nodes)):  # longest path; the graph is acyclic, a cycle just stops after len(nodes) passes
        moved = False
        for a, b in edges:
            if level[b] < level[a] + 1:
                level[b] = level[a] + 1
                moved = True
        if not moved:
            break
    columns: dict[int, list[Node]] = {}
    for n in nodes:
        columns.setdefault(level[n.id], []).append(n)
    w, h, gx, gy, pad = 158, 18 + 16 * max((len(n.lines) for n in nodes), default=1), 32, 14, 8
    pos = {}
    rows = max((len(c) for c in columns.values()), default=1)
    for col, members in columns.items():
        offset = (rows - len(members)) * (h + gy) / 2
        for i, n in enumerate(members):
            pos[n.id] = (pad + col * (w + gx), pad + offset + i * (h + gy))
    width = pad * 2 + (max(columns, default=0) + 1) * (w + gx) - gx
    height = pad * 2 + rows * (h + gy) - gy
    out = [
        f'<svg class="dag" viewBox="0 0 {width:.0f} {height:.0f}" width="{width:.0f}" role="img" aria-label="{_e(label)}">'
    ]
    out.append(
        '<defs><marker id="arrow" viewBox="0 0 8 8" refX="8" refY="4" markerWidth="7" markerHeight="7" orient="auto">'
        '<path d="M0,0 L8,4 L0,8 z" fill="#8a93a3"/></marker></defs>'
    )
    for a, b in edges:
        (x1, y1), (x2, y2) = pos[a], pos[b]
        sx, sy, ex, ey = x1 + w, y1 + h / 2, x2, y2 + h / 2
        mx = (sx + ex) / 2
        out.append(
            f'<path d="M{sx:.0f},{sy:.0f} C{mx:.0f},{sy:.0f} {mx:.0f},{ey:.0f} {ex:.0f},{ey:.0f}" fill="none" stroke="#8a93a3" stroke-width="1.4" marker-end="url(#arrow)"/>'
        )
    for n in nodes:
        x, y = pos[n.id]
        fill, stroke = STATUS_FILL.get(n.status, "#fff"), STATUS_STROKE.get(n.status, "#667")
        body = [f'<g class="node" data-node="{_e(n.id)}" data-status="{_e(n.status)}">']
        if n.title:
            body.append(f"<title>{_e(n.title)}</title>")
        dash = ' stroke-dasharray="4 3"' if n.status == "PENDING" else ""
        body.append(
            f'<rect x="{x:.0f}" y="{y:.0f}" width="{w}" height="{h}" rx="7" fill="{fill}" stroke="{stroke}" stroke-width="1.5"{dash}/>'
        )
        for i, line in enumerate(n.lines):
            weight = ' font-weight="600"' if i == 0 else ' fill="#3b4350"'
            size = 13 if i == 0 else 11
            text = line if len(line) <= 23 else line[:22] + "…"
            body.append(f'<text x="{x + 9:.0f}" y="{y + 18 + i * 16:.0f}" font-size="{size}"{weight}>{_e(text)}</text>')
        body.append("</g>")
        piece = "".join(body)
        out.append(f'<a href="{_e(n.href)}">{piece}</a>' if n.href else piece)
    out.append("</svg>")
    return "".join(out)


def _num(x: float) -> str:
    return f"{x:.4g}"


def chart(curves: Sequence[Curve], *, width: int = 560, height: int = 250) -> str:
    """A line chart of the curves on shared axes (step on x), with a legend below."""
    pts = [p for c in curves for p in c.points]
    if not pts:
        return ""
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    left, right, top, bottom = 56, 12, 12, 28

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * (height - top - bottom)

    out = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="training loss">']
    out.append(
        f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" fill="none" stroke="#ccd"/>'
    )
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        out.append(
            f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" font-size="12" text-anchor="end" fill="#667">{_num(y)}</text>'
        )
        x = x0 + (x1 - x0) * i / 4
        out.append(
            f'<text x="{sx(x):.1f}" y="{height - 8}" font-size="12" text-anchor="middle" fill="#667">{x:.0f}</text>'
        )
    for i, c in enumerate(curves):
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in c.points)
        out.append(
            f'<polyline class="curve" data-label="{_e(c.label)}" fill="none" stroke="{COLORS[i % len(COLORS)]}" stroke-width="1.8" points="{path}"><title>{_e(c.label)}</title></polyline>'
        )
    out.append("</svg>")
    legend = "".join(
        f'<li><span style="color:{COLORS[i % len(COLORS)]}">&#9632;</span> {_e(c.label)} '
        f'<span class="muted">({_num(c.points[0][1])} → {_num(c.points[-1][1])}, {len(c.points)} points)</span></li>'
        for i, c in enumerate(curves)
    )
    return "".join(out) + f'<ul class="legend">{legend}</ul>'
