"""Inline SVG for the pages: the step graph of a run and line charts of training loss. Both scale to the
screen (viewBox), so they work on a phone as on a desktop."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

from kollm.eval.report import Curve

COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"]
# status -> (fill, stroke, dash, legend text); CACHED is a FINISHED step whose result came from the cache
STYLES = {
    "FINISHED": ("#e7f6eb", "#2f8f4e", "", "computed"),
    "CACHED": ("#e6f0fb", "#3a6ea5", "2 2", "cache hit"),
    "RUNNING": ("#e0ecff", "#2563eb", "", "running"),
    "FAILED": ("#fbe9e7", "#b3261e", "", "failed"),
    "KILLED": ("#fbe9e7", "#b3261e", "", "killed"),
    "PENDING": ("#f1f2f5", "#9aa1ad", "6 3", "not started yet"),
    "SKIPPED": ("#f7f7f8", "#b9bec7", "1 4", "skipped (the run failed first)"),
    "DATA": ("#fff8e1", "#b08900", "", "raw data"),
}
NODE_W, GAP_X, GAP_Y, PAD, DUMMY = 170, 46, 16, 8, 10


def _e(x: object) -> str:
    return html.escape(str(x))


@dataclass
class Node:
    id: str
    lines: list[str]  # first line bold
    status: str  # a key of STYLES
    href: str | None = None
    title: str = ""


def _layers(nodes: Sequence[Node], edges: list[tuple[str, str]]) -> dict[str, int]:
    """Longest path from a source; a source (raw data) sits one layer before its first reader."""
    level = {n.id: 0 for n in nodes}
    for _ in range(len(nodes)):  # the graph is acyclic; a cycle just stops after len(nodes) passes
        moved = False
        for a, b in edges:
            if level[b] < level[a] + 1:
                level[b], moved = level[a] + 1, True
        if not moved:
            break
    targets = {b for _, b in edges}
    for n in nodes:
        readers = [level[b] for a, b in edges if a == n.id]
        if n.id not in targets and readers:
            level[n.id] = min(readers) - 1
    return level


def dag(
    nodes: Sequence[Node], edges: Sequence[tuple[str, str]], *, label: str = "step graph", vertical: bool = False
) -> str:
    """A layered drawing (Sugiyama style): nodes in layers by longest path, an edge spanning several layers routed
    through a free slot in each layer between (so no edge passes behind a node), order within a layer by the
    barycentre of the neighbours. Left to right, or top to bottom with `vertical` (phone width). The viewBox is
    the drawing's size and the SVG scales to its container, never beyond its natural size."""
    ids = {n.id for n in nodes}
    edges = list(dict.fromkeys((a, b) for a, b in edges if a in ids and b in ids and a != b))
    level = _layers(nodes, edges)
    layers: dict[int, list[str]] = {}
    for n in nodes:
        layers.setdefault(level[n.id], []).append(n.id)
    chains: list[list[str]] = []  # each edge as the slots it passes: source, dummies..., target
    for head, tail in edges:
        slots = [head]
        for lv in range(level[head] + 1, level[tail]):
            dummy = f"~{head}->{tail}@{lv}"
            layers.setdefault(lv, []).append(dummy)
            slots.append(dummy)
        chains.append(slots + [tail])
    up: dict[str, list[str]] = {}
    down: dict[str, list[str]] = {}
    for chain in chains:
        for src, dst in zip(chain, chain[1:]):
            down.setdefault(src, []).append(dst)
            up.setdefault(dst, []).append(src)
    order = sorted(layers)
    for sweep in range(4):  # barycentre ordering, down then up
        seq = order[1:] if sweep % 2 == 0 else order[-2::-1]
        for lv in seq:
            near = up if sweep % 2 == 0 else down
            pos = {v: i for other in layers.values() for i, v in enumerate(other)}
            layers[lv].sort(
                key=lambda v: sum(pos[u] for u in near.get(v, [])) / len(near[v]) if near.get(v) else pos[v]
            )
    h = 18 + 16 * max((len(n.lines) for n in nodes), default=1)
    by_id = {n.id: n for n in nodes}

    def extent(v: str) -> float:  # size across the flow
        return (h if not vertical else NODE_W) if v in by_id else DUMMY

    along = NODE_W if not vertical else h  # size along the flow
    gap_along, gap_across = (GAP_X, GAP_Y) if not vertical else (GAP_Y + 22, GAP_X / 3)
    spans = {lv: sum(extent(v) for v in vs) + gap_across * (len(vs) - 1) for lv, vs in layers.items()}
    across = max(spans.values(), default=0)
    first = min(order, default=0)
    box: dict[str, tuple[float, float, float, float]] = {}  # x, y, w, h
    for lv, vs in layers.items():
        at = PAD + (lv - first) * (along + gap_along)
        cross = PAD + (across - spans[lv]) / 2
        for v in vs:
            e = extent(v)
            box[v] = (at, cross, along, e) if not vertical else (cross, at, e, along)
            cross += e + gap_across
    width = PAD * 2 + (across if vertical else (len(order) * (along + gap_along) - gap_along))
    height = PAD * 2 + (across if not vertical else (len(order) * (along + gap_along) - gap_along))
    cls = "dag v" if vertical else "dag h"
    out = [
        f'<svg class="{cls}" viewBox="0 0 {width:.0f} {height:.0f}" style="max-width:{width:.0f}px" '
        f'role="img" aria-label="{_e(label)}">'
    ]
    marker = "arrow-v" if vertical else "arrow-h"
    out.append(
        f'<defs><marker id="{marker}" viewBox="0 0 8 8" refX="8" refY="4" markerWidth="7" markerHeight="7" '
        'orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#8a93a3"/></marker></defs>'
    )

    def out_port(v: str) -> tuple[float, float]:
        x, y, w, hh = box[v]
        return (x + w, y + hh / 2) if not vertical else (x + w / 2, y + hh)

    def in_port(v: str) -> tuple[float, float]:
        x, y, w, hh = box[v]
        return (x, y + hh / 2) if not vertical else (x + w / 2, y)

    for chain in chains:
        d = ""
        for i, (u, v) in enumerate(zip(chain, chain[1:])):
            (sx, sy), (ex, ey) = out_port(u), in_port(v)
            if i == 0:
                d += f"M{sx:.1f},{sy:.1f}"
            elif u not in by_id:  # through a dummy slot: straight across it
                d += f" L{sx:.1f},{sy:.1f}"
            if not vertical:
                mx = (sx + ex) / 2
                d += f" C{mx:.1f},{sy:.1f} {mx:.1f},{ey:.1f} {ex:.1f},{ey:.1f}"
            else:
                my = (sy + ey) / 2
                d += f" C{sx:.1f},{my:.1f} {ex:.1f},{my:.1f} {ex:.1f},{ey:.1f}"
        out.append(
            f'<path class="edge" data-from="{_e(chain[0])}" data-to="{_e(chain[-1])}" d="{d}" fill="none" '
            f'stroke="#8a93a3" stroke-width="1.4" marker-end="url(#{marker})"/>'
        )
    for n in nodes:
        x, y, w, hh = box[n.id]
        fill, stroke, dash, _ = STYLES.get(n.status, ("#fff", "#667", "", n.status))
        body = [f'<g class="node" data-node="{_e(n.id)}" data-status="{_e(n.status)}">']
        if n.title:
            body.append(f"<title>{_e(n.title)}</title>")
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        opacity = ' opacity="0.75"' if n.status == "SKIPPED" else ""
        body.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.0f}" height="{hh:.0f}" rx="7" fill="{fill}" stroke="{stroke}" '
            f'stroke-width="{2.2 if n.status in ("FAILED", "CACHED") else 1.5}"{dash_attr}{opacity}/>'
        )
        for i, line in enumerate(n.lines):
            weight = ' font-weight="600"' if i == 0 else ' fill="#3b4350"'
            size = 13 if i == 0 else 11
            text = line if len(line) <= 24 else line[:23] + "…"
            body.append(f'<text x="{x + 9:.1f}" y="{y + 18 + i * 16:.1f}" font-size="{size}"{weight}>{_e(text)}</text>')
        body.append("</g>")
        piece = "".join(body)
        out.append(f'<a href="{_e(n.href)}">{piece}</a>' if n.href else piece)
    out.append("</svg>")
    return "".join(out)


def legend(statuses: Sequence[str]) -> str:
    """The key to the node styles that a graph uses."""
    items = []
    for st in STYLES:
        if st in statuses:
            fill, stroke, dash, text = STYLES[st]
            dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
            items.append(
                f'<li data-legend="{st}"><svg viewBox="0 0 22 14" width="22" height="14" aria-hidden="true">'
                f'<rect x="1" y="1" width="20" height="12" rx="3" fill="{fill}" stroke="{stroke}" stroke-width="1.5"'
                f"{dash_attr}/></svg> {_e(text)}</li>"
            )
    return f'<ul class="dag-legend">{"".join(items)}</ul>'


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 times a power of ten) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi <= lo:
        lo, hi = lo - (abs(lo) or 1) * 0.5, hi + (abs(hi) or 1) * 0.5
    raw = (hi - lo) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step + 1e-9) * step
    ticks = []
    t = start
    while t < hi + step * 0.999:
        ticks.append(round(t, 12))
        t += step
    return ticks


def tick_label(v: float, ticks: Sequence[float]) -> str:
    """A tick value with as many decimals as the spacing needs: 0.4, 2.5, 1e-3, 12k."""
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else 1.0
    big = max(abs(t) for t in ticks)
    if v == 0:
        return "0"
    if big >= 1e5 or big < 1e-3:
        return f"{v:.1e}".replace(".0e", "e").replace("e-0", "e-").replace("e+0", "e")
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if step * 10**decimals % 1 > 1e-6:  # 2.5 steps
        decimals += 1
    return f"{v:,.{decimals}f}"


def value_label(v: float) -> str:
    return f"{v:.4g}"


def chart(
    curves: Sequence[Curve],
    *,
    title: str,
    y_label: str,
    x_label: str = "optimizer step",
    width: int = 560,
    height: int = 260,
) -> str:
    """A line chart of the curves on shared axes: axis titles, round ticks, a grid, each point's value on hover
    (an SVG <title>), a legend below."""
    pts = [p for c in curves for p in c.points]
    if not pts:
        return ""
    xt = nice_ticks(min(p[0] for p in pts), max(p[0] for p in pts), 6)
    yt = nice_ticks(min(p[1] for p in pts), max(p[1] for p in pts), 5)
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]
    left, right, top, bottom = 66, 14, 12, 46

    def sx(x: float) -> float:
        return left + (x - x0) / ((x1 - x0) or 1) * (width - left - right)

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / ((y1 - y0) or 1)) * (height - top - bottom)

    out = [
        f'<figure class="chart" data-metric="{_e(title)}"><figcaption>{_e(title)}</figcaption>'
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">'
    ]
    for y in yt:
        out.append(
            f'<line class="grid" x1="{left}" x2="{width - right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#e6e8ee"/>'
            f'<text class="ytick" x="{left - 6}" y="{sy(y) + 4:.1f}" font-size="12" text-anchor="end" fill="#555">'
            f"{tick_label(y, yt)}</text>"
        )
    for x in xt:
        out.append(
            f'<line class="grid" x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{top}" y2="{height - bottom}" stroke="#eef0f4"/>'
            f'<text class="xtick" x="{sx(x):.1f}" y="{height - bottom + 16}" font-size="12" text-anchor="middle" '
            f'fill="#555">{tick_label(x, xt)}</text>'
        )
    out.append(
        f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" fill="none" '
        'stroke="#b8bfcc"/>'
        f'<text class="axis-title" x="{(left + width - right) / 2:.0f}" y="{height - 6}" font-size="12" '
        f'text-anchor="middle" fill="#333">{_e(x_label)}</text>'
        f'<text class="axis-title" transform="translate(14 {(top + height - bottom) / 2:.0f}) rotate(-90)" '
        f'font-size="12" text-anchor="middle" fill="#333">{_e(y_label)}</text>'
    )
    for i, c in enumerate(curves):
        color = COLORS[i % len(COLORS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in c.points)
        out.append(
            f'<polyline class="curve" data-label="{_e(c.label)}" fill="none" stroke="{color}" stroke-width="1.8" '
            f'points="{path}"/>'
        )
        out.append(
            "".join(
                f'<circle class="pt" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4" fill="{color}">'
                f"<title>{_e(c.label)} · {_e(x_label)} {x:g}: {value_label(y)}</title></circle>"
                for x, y in c.points
            )
        )
    out.append("</svg>")
    legend_items = "".join(
        f'<li><span style="color:{COLORS[i % len(COLORS)]}">&#9632;</span> {_e(c.label)} '
        f'<span class="muted">({value_label(c.points[0][1])} → {value_label(c.points[-1][1])}, '
        f"{len(c.points)} points)</span></li>"
        for i, c in enumerate(curves)
    )
    return "".join(out) + f'<ul class="legend">{legend_items}</ul></figure>'
