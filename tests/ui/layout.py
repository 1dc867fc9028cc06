"""The layout check the browser tests run on every UI page, and the stored layout descriptions they compare against.

`check(pg)` lists what is wrong with the page as laid out now (empty: nothing), at any width:
- the page is wider than the viewport, or a visible element's box sticks out of its parent's box or the viewport
  sideways, unless it sits inside a box marked to scroll sideways on purpose (`.scroll`, `pre`, `iframe`);
- an element that is not marked to scroll hides content in a sideways scroll of its own, or clips its content
  (`overflow: hidden` with more inside than it shows: text cut off);
- SVG text outside its drawing's viewBox (clipped), step graph nodes that overlap each other, a node's text outside
  its box, an edge that passes behind a node.

`describe(pg)` is the page's layout in words, not pixels (fonts differ between machines): each visible landmark
(header, nav, main, headings, sections, forms, tables, scroll boxes, the step graph, charts, ...) in document order,
indented under the landmark that contains it, with where it sits against the previous landmark of the same container
(`first`, `below`, `right`, `left`, `overlaps`) and whether it takes the container's full width. `compare(name, width,
described)` checks it against tests/ui/layouts/NAME.json; `KOLLM_UI_LAYOUTS=update` (re)writes those files instead
(review the diff before committing it).
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

LAYOUTS = Path(__file__).resolve().parent / "layouts"
UPDATE_ENV = "KOLLM_UI_LAYOUTS"  # =update: write the descriptions the pages have now instead of comparing

CHECK = """() => {
  const vw = document.documentElement.clientWidth, bad = [];
  const name = el => {
    let s = el.tagName.toLowerCase();
    if (el.id) s += '#' + el.id;
    const cls = typeof el.className === 'string' ? el.className.trim() : '';
    if (cls) s += '.' + cls.split(/\\s+/).join('.');
    const text = el.children.length ? '' : (el.textContent || '').trim().replace(/\\s+/g, ' ');
    return text ? `${s} "${text.slice(0, 40)}"` : s;
  };
  const px = r => `${Math.round(r.left)}-${Math.round(r.right)}`;
  const wide = document.documentElement.scrollWidth;
  if (wide > vw + 1) bad.push(`the page is ${wide}px wide in a ${vw}px viewport`);
  const MARKED = '.scroll, pre, iframe, textarea';
  for (const el of document.body.querySelectorAll('*')) {
    if (el.closest('svg') && el.tagName.toLowerCase() !== 'svg') continue;  // drawings: checked below
    const r = el.getBoundingClientRect();
    if (r.width === 0 && r.height === 0) continue;
    if (!el.checkVisibility({visibilityProperty: true})) continue;  // hidden, or inside a closed <details>
    const cs = getComputedStyle(el);
    const parent = el.parentElement;
    if (!(parent && parent.closest(MARKED))) {  // inside a box that scrolls on purpose anything may be wide
      if (r.left < -1 || r.right > vw + 1) bad.push(`${name(el)} at ${px(r)} is outside the viewport (0-${vw})`);
      if (parent && parent !== document.body) {
        const p = parent.getBoundingClientRect();
        if (p.width > 0 && (r.left < p.left - 1 || r.right > p.right + 1))
          bad.push(`${name(el)} at ${px(r)} sticks out of its container ${name(parent)} at ${px(p)}`);
      }
    }
    if (!el.matches(MARKED)) {
      if (cs.overflowX !== 'visible' && el.scrollWidth > el.clientWidth + 1)
        bad.push(cs.overflowX === 'hidden' || cs.overflowX === 'clip'
          ? `${name(el)} clips its content sideways (${el.scrollWidth}px in ${el.clientWidth}px)`
          : `${name(el)} hides ${el.scrollWidth - el.clientWidth}px in a sideways scroll not marked .scroll`);
      if ((cs.overflowY === 'hidden' || cs.overflowY === 'clip') && el.scrollHeight > el.clientHeight + 1)
        bad.push(`${name(el)} clips its content (${el.scrollHeight}px high in ${el.clientHeight}px)`);
    }
  }
  for (const svg of document.querySelectorAll('svg')) {
    if (svg.getBoundingClientRect().width === 0) continue;  // hidden (the other orientation of a graph)
    const vb = svg.viewBox.baseVal;
    if (!vb || !vb.width) continue;
    const inside = (b, o, tol) => b.x >= o.x - tol && b.y >= o.y - tol && b.x + b.width <= o.x + o.width + tol
      && b.y + b.height <= o.y + o.height + tol;
    const box = svg.getBoundingClientRect();
    for (const t of svg.querySelectorAll('text')) {  // on screen: rotated axis titles too
      const b = t.getBoundingClientRect();
      if (b.width && (b.left < box.left - 1 || b.right > box.right + 1 || b.top < box.top - 1 || b.bottom > box.bottom + 1))
        bad.push(`svg text "${t.textContent.slice(0, 40)}" is clipped by its drawing`);
    }
    if (!svg.matches('svg.dag')) continue;
    const nodes = [...svg.querySelectorAll('g.node')].map(g => [g.dataset.node, g.querySelector('rect').getBBox(), g]);
    for (const [id, r, g] of nodes) {
      for (const t of g.querySelectorAll('text'))
        if (!inside(t.getBBox(), r, 0.5)) bad.push(`the text "${t.textContent}" of node ${id} is outside its box`);
    }
    for (let i = 0; i < nodes.length; i++)
      for (let j = i + 1; j < nodes.length; j++) {
        const [a, r] = nodes[i], [b, q] = nodes[j];
        if (r.x < q.x + q.width && q.x < r.x + r.width && r.y < q.y + q.height && q.y < r.y + r.height)
          bad.push(`nodes ${a} and ${b} overlap`);
      }
    for (const p of svg.querySelectorAll('path.edge')) {
      const len = p.getTotalLength();
      for (let i = 1; i < 60; i++) {
        const pt = p.getPointAtLength(len * i / 60);
        for (const [id, r] of nodes)
          if (pt.x > r.x + 2 && pt.x < r.x + r.width - 2 && pt.y > r.y + 2 && pt.y < r.y + r.height - 2) {
            bad.push(`edge ${p.dataset.from}->${p.dataset.to} passes behind ${id}`);
            break;
          }
      }
    }
  }
  return [...new Set(bad)].slice(0, 15);
}"""

LANDMARKS = (
    "header, nav, main, h1, h2, h3, section, form, table, .scroll, .graph, svg.dag, ul.dag-legend, .charts, "
    "figure, pre, iframe, details, .actions, ol.timeline, .bar"
)

DESCRIBE = (
    """() => {
  const SEL = '%s';
  const shown = el => { const r = el.getBoundingClientRect();
    return r.width > 0 && r.height > 0 && el.checkVisibility({visibilityProperty: true}); };
  const els = [...document.querySelectorAll(SEL)].filter(shown), set = new Set(els);
  const key = el => {
    let k = el.tagName.toLowerCase();
    if (el.id) k += '#' + el.id;
    const cls = [...el.classList].filter(c => !/^[a-z]-/.test(c)).sort();  // not s-finished, g-passed, ...: state
    if (cls.length) k += '.' + cls.join('.');
    if (el.matches('figure') && el.dataset.metric) k += `[${el.dataset.metric}]`;
    return k;
  };
  const content = el => {  // the width its children can take
    if (!el) return [0, document.documentElement.clientWidth];
    const r = el.getBoundingClientRect(), cs = getComputedStyle(el);
    const l = r.left + parseFloat(cs.borderLeftWidth) + parseFloat(cs.paddingLeft);
    return [l, r.right - parseFloat(cs.borderRightWidth) - parseFloat(cs.paddingRight) - l];
  };
  const depth = new Map(), last = new Map(), out = [];
  for (const el of els) {
    let p = el.parentElement;
    while (p && !set.has(p)) p = p.parentElement;
    depth.set(el, p ? depth.get(p) + 1 : 0);
    const r = el.getBoundingClientRect(), prev = last.get(p || null);
    let at = 'first';
    if (prev) {
      const q = prev.getBoundingClientRect();
      at = r.top >= q.bottom - 1 ? 'below' : r.left >= q.right - 1 ? 'right' : r.right <= q.left + 1 ? 'left' : 'overlaps';
    }
    last.set(p || null, el);
    const full = r.width >= content(p)[1] * 0.98 - 1;
    out.push('  '.repeat(depth.get(el)) + key(el) + ' ' + at + (full ? ' full' : ''));
  }
  return out;
}"""
    % LANDMARKS
)


def check(pg) -> list[str]:
    """What is wrong with the layout of the page (and of the pages in its frames, such as a report) as it is now."""
    bad = list(pg.evaluate(CHECK))
    for frame in pg.frames[1:]:
        bad += [f"in frame {frame.url}: {b}" for b in frame.evaluate(CHECK)]
    return bad


def describe(pg) -> list[str]:
    return list(pg.evaluate(DESCRIBE))


def stored(name: str) -> dict[str, list[str]]:
    path = LAYOUTS / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def diff(name: str, width: int, described: list[str]) -> str:
    """How `described` differs from the stored layout of page `name` at `width` ("" when it is the same)."""
    want = stored(name).get(str(width))
    if want is None:
        return f"no stored layout for {name} at {width}px in {LAYOUTS / (name + '.json')}"
    return "\n".join(difflib.unified_diff(want, described, "stored", "now", lineterm="", n=2))


def compare(name: str, width: int, described: list[str]) -> None:
    """Asserts that the page's layout at `width` is the stored one (with KOLLM_UI_LAYOUTS=update: stores it)."""
    path = LAYOUTS / f"{name}.json"
    if os.environ.get(UPDATE_ENV) == "update":
        layouts = stored(name)
        layouts[str(width)] = described
        LAYOUTS.mkdir(parents=True, exist_ok=True)
        text = json.dumps(dict(sorted(layouts.items(), key=lambda kv: int(kv[0]))), indent=1, ensure_ascii=False)
        path.write_text(text + "\n", encoding="utf-8")
        return
    d = diff(name, width, described)
    assert not d, (
        f"the layout of {name} at {width}px is not the stored one in {path} (if the change is intended, rerun the "
        f"UI tests with {UPDATE_ENV}=update, review and commit the new file):\n{d}"
    )
