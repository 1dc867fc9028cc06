"""What the run and step pages draw, checked in chromium over the session's demo project: the step graph laid out
without clipping or edges behind nodes at 390-1920 px, charts from each run's own MLflow history (a cache hit:
the run that computed it) with axis titles, round ticks, a grid and hover values, a failed run's unrun steps."""

from __future__ import annotations

import json
import math
from urllib.parse import quote

import pytest

import kollm
from kollm.errors import KollmError
from kollm.pipeline.tracking import client_for, tracking_uri

from . import layout
from .conftest import PHONE, WIDE, shoot

WIDTHS = [390, 768, 1440, 1920]

# every visible step graph: its nodes inside it, it inside its box and the viewport; no edge crosses a node
GRAPH_CHECK = """() => {
  const out = [];
  const vw = document.documentElement.clientWidth;
  for (const svg of document.querySelectorAll('svg.dag')) {
    const s = svg.getBoundingClientRect();
    if (s.width === 0) continue;  // the other orientation, hidden by CSS
    const box = svg.closest('.graph').getBoundingClientRect();
    if (s.left < box.left - 1 || s.right > box.right + 1) out.push(`svg ${s.left}-${s.right} outside its box`);
    if (s.right > vw + 1) out.push(`svg right ${s.right} > viewport ${vw}`);
    const rects = [...svg.querySelectorAll('g.node')].map(g => [g.dataset.node, g.querySelector('rect').getBBox()]);
    const vb = svg.viewBox.baseVal;
    for (const [id, r] of rects) {
      if (r.x < vb.x || r.y < vb.y || r.x + r.width > vb.x + vb.width || r.y + r.height > vb.y + vb.height)
        out.push(`node ${id} clipped`);
    }
    for (const p of svg.querySelectorAll('path.edge')) {
      const len = p.getTotalLength();
      for (let i = 1; i < 60; i++) {
        const pt = p.getPointAtLength(len * i / 60);
        for (const [id, r] of rects) {
          if (pt.x > r.x + 2 && pt.x < r.x + r.width - 2 && pt.y > r.y + 2 && pt.y < r.y + r.height - 2)
            out.push(`edge ${p.dataset.from}->${p.dataset.to} passes behind ${id}`);
        }
      }
    }
  }
  return out;
}"""


def mlflow_client(project):
    return client_for(tracking_uri(project))


def step_run(project, pipeline_run_id, name):
    c = mlflow_client(project)
    exp = c.get_run(pipeline_run_id).info.experiment_id
    (run,) = c.search_runs(
        [exp], filter_string=f"tags.mlflow.parentRunId = '{pipeline_run_id}' and tags.`kollm.step` = '{name}'"
    )
    return run


def test_step_graph_fits_every_width_and_no_edge_passes_behind_a_node(demo, page):
    url = f"{demo.url}/runs/{demo.run_ids[0]}"
    for w in WIDTHS:
        page.set_viewport_size({"width": w, "height": 900})
        page.goto(url)
        assert page.evaluate(GRAPH_CHECK) == [], w
        visible = page.locator("svg.dag:visible")
        assert visible.count() == 1
        font = page.evaluate(
            "() => { const s = [...document.querySelectorAll('svg.dag')].find(s => s.getBoundingClientRect().width);"
            " return s.getBoundingClientRect().width / s.viewBox.baseVal.width * 13; }"
        )
        assert font >= 9, f"step names drawn {font:.1f}px high at {w}px"
        shoot(page, f"graph-{w}")
    # the legend names each style the graph uses; the second run's cpt is a cache hit, drawn as such
    page.set_viewport_size({"width": 1440, "height": 900})
    page.goto(f"{demo.url}/runs/{demo.run_ids[1]}")
    assert page.locator('svg.dag.h g.node[data-node="cpt"]').get_attribute("data-status") == "CACHED"
    assert page.locator('svg.dag.h g.node[data-node="register"]').get_attribute("data-status") == "FINISHED"
    legend = page.locator("ul.dag-legend li").evaluate_all("els => els.map(e => e.dataset.legend)")
    assert {"CACHED", "FINISHED", "DATA"} <= set(legend)


def test_charts_axes_ticks_grid_and_hover_values(demo, page):
    first = demo.run_ids[0]
    cpt = step_run(demo.dir, first, "cpt")
    page.goto(f"{demo.url}/runs/{first}")
    loss = page.locator('figure.chart[data-metric="Training loss (cross-entropy)"]')
    titles = loss.locator("text.axis-title").all_text_contents()
    assert titles == ["optimizer step", "loss (nats/token)"]
    assert loss.locator("line.grid").count() >= 6
    for cls in ("ytick", "xtick"):
        ticks = [float(t.replace(",", "")) for t in loss.locator(f"text.{cls}").all_text_contents()]
        gaps = {round(b - a, 9) for a, b in zip(ticks, ticks[1:])}
        assert len(gaps) == 1, ticks  # evenly spaced
        (gap,) = gaps
        mant = gap / 10 ** math.floor(math.log10(gap))
        assert round(mant, 6) in (1, 2, 2.5, 5), ticks  # round numbers
    history = mlflow_client(demo.dir).get_metric_history(cpt.info.run_id, "loss")
    hovers = loss.locator("circle.pt title").all_text_contents()
    assert hovers == [
        f"cpt: loss · optimizer step {m.step}: {m.value:.4g}" for m in sorted(history, key=lambda m: m.step)
    ]
    # the other logged series have charts of their own
    metrics = page.locator("figure.chart").evaluate_all("els => els.map(e => e.dataset.metric)")
    assert metrics[0] == "Training loss (cross-entropy)"
    assert "Learning rate" in metrics and "Gradient norm" in metrics
    lr = page.locator('figure.chart[data-metric="Learning rate"] polyline.curve').get_attribute("points").split()
    assert len(lr) == len(mlflow_client(demo.dir).get_metric_history(cpt.info.run_id, "learning_rate"))


def test_a_cached_step_shows_the_computing_runs_history_not_the_shared_log(demo, page):
    """Another training of `cpt` (a longer one, another run) in the shared training log changes nothing: the cached
    step's chart and log tail are the run that computed it."""
    first, second = demo.run_ids
    computing = step_run(demo.dir, first, "cpt")
    cached = step_run(demo.dir, second, "cpt")
    log = demo.dir / ".kollm" / "logs" / "training" / "cpt.jsonl"
    original = log.read_text(encoding="utf-8")
    other = [
        {
            "ts": "2099-01-01T00:00:00.000+00:00",
            "level": "INFO",
            "component": "train",
            "event": "train_metrics",
            "step": "cpt",
            "global_step": s,
            "loss": 9.0,
            "run_id": "another-run",
        }
        for s in range(0, 91, 3)
    ]
    log.write_text(original + "".join(json.dumps(r) + "\n" for r in other), encoding="utf-8")
    try:
        page.goto(f"{demo.url}/runs/{second}")
        points = page.locator('svg.chart polyline[data-label="cpt: loss"]').get_attribute("points").split()
        history = mlflow_client(demo.dir).get_metric_history(computing.info.run_id, "loss")
        assert len(points) == len(history) == 6
        page.goto(f"{demo.url}/steps/{cached.info.run_id}")
        link = page.locator("a.computed-by")
        assert link.get_attribute("href") == f"/steps/{computing.info.run_id}"
        tail = page.locator("pre.log").last.text_content().splitlines()
        assert tail and all(json.loads(line).get("run_id") in (None, computing.info.run_id) for line in tail)
        assert "another-run" not in page.locator("main").text_content()
    finally:
        log.write_text(original, encoding="utf-8")


def test_a_failed_runs_unrun_steps_are_skipped(demo, page):
    """The gate fails: evaluate FAILED, register never ran and is drawn SKIPPED (not left out)."""
    with pytest.raises(KollmError):
        kollm.run(demo.dir, overrides={"evaluate.gate": ["perplexity <= 0.0001"]})
    from kollm.pipeline.history import list_runs

    failed = list_runs(demo.dir)[0]
    assert failed.status == "FAILED"
    page.goto(f"{demo.url}/runs/{failed.run_id}")
    status = {
        n: page.locator(f'svg.dag.h g.node[data-node="{n}"]').get_attribute("data-status")
        for n in ("cpt", "evaluate", "register")
    }
    assert status == {"cpt": "CACHED", "evaluate": "FAILED", "register": "SKIPPED"}
    assert page.evaluate(GRAPH_CHECK) == []
    legend = page.locator("ul.dag-legend li").evaluate_all("els => els.map(e => e.dataset.legend)")
    assert {"FAILED", "SKIPPED", "CACHED"} <= set(legend)


def test_layout_at_phone_and_desktop_width(demo, page):
    """Every page at 390x844 and 1440x900: the layout check finds nothing, the landmarks are laid out as stored in
    tests/ui/layouts/ (KOLLM_UI_LAYOUTS=update rewrites them), screenshots in build/ui-screenshots/layout-*."""
    from kollm import registry

    first, second = demo.run_ids[:2]
    steps = {n: step_run(demo.dir, first, n) for n in ("cpt", "evaluate", "prepare-corpus")}
    prep = steps["prepare-corpus"]
    raw = prep.data.tags["kollm.input.source.digest"]
    # the registry page's sections depend on its aliases: a champion and a challenger (other tests move them too)
    if "champion" not in {a for v in registry.list_versions("ui-demo", demo.dir) for a in v.aliases}:
        registry.promote("ui-demo", "2", "first champion", demo.dir)
    champion = registry.show("ui-demo", "champion", demo.dir).version
    registry.set_alias("ui-demo", "challenger", "1" if champion == "2" else "2", reason="layout", project_dir=demo.dir)
    pages = {
        "runs": "/runs",
        "compare": f"/compare?run={first}&run={second}",
        "run": f"/runs/{first}",
        "run-cached": f"/runs/{second}",
        "step-cpt": f"/steps/{steps['cpt'].info.run_id}",
        "step-evaluate": f"/steps/{steps['evaluate'].info.run_id}",
        "output": f"/steps/{prep.info.run_id}/outputs/dataset",
        "report": f"/steps/{prep.info.run_id}/report?path=prepare%2Freport.html",
        "registry": "/registry/ui-demo",
        "registry-confirm": "/registry/ui-demo/promote?version=1",
        "lineage": "/lineage/ui-demo/2",
        "lineage-forward": f"/lineage?digest={quote(raw)}",
        "lineage-search": "/lineage",
        "rollout": "/rollout",
        "not-found": "/steps/no-such-run",
    }
    for size in (PHONE, WIDE):
        page.set_viewport_size(size)
        width = size["width"]
        for name, path in pages.items():
            page.goto(f"{demo.url}{path}")
            shoot(page, f"layout-{name}-{width}")
            assert layout.check(page) == [], (name, width)
            layout.compare(name, width, layout.describe(page))
            if width == 390:  # runs, steps and versions are cards on a phone: nothing to scroll sideways
                wide = page.evaluate(
                    "() => [...document.querySelectorAll('table.cards')].filter(t => {"
                    " const box = t.closest('.scroll'); return box.scrollWidth > box.clientWidth + 1; })"
                    ".map(t => t.className)"
                )
                assert wide == [], (name, wide)
            if name == "report":  # the report inside the page is as wide as the page, not 980 px
                frame = page.frame_locator("iframe.report")
                assert frame.locator("body").evaluate("b => document.documentElement.clientWidth") <= width


def test_the_layout_check_fails_when_a_layout_breaks(demo, page):
    """The checks above can fail: CSS that widens an element, hides content in an unmarked sideways scroll, clips
    text or moves a chart below another is found by the check or by the comparison with the stored layout."""
    page.set_viewport_size(WIDE)
    page.goto(f"{demo.url}/runs/{demo.run_ids[0]}")
    assert layout.check(page) == [] and layout.diff("run", 1440, layout.describe(page)) == ""
    page.add_style_tag(content="h1 { width: 1600px }")
    assert any("h1" in b and "outside the viewport" in b for b in layout.check(page)), layout.check(page)
    page.goto(f"{demo.url}/runs/{demo.run_ids[0]}")
    page.add_style_tag(content=".graph { overflow-x: auto } .graph svg.dag.h { min-width: 1800px }")
    assert any("div.graph hides" in b for b in layout.check(page)), layout.check(page)
    page.goto(f"{demo.url}/runs/{demo.run_ids[0]}")
    page.add_style_tag(content="figure.chart figcaption { white-space: nowrap; overflow: hidden; width: 3em }")
    assert any(b.startswith("figcaption") and "clips its content" in b for b in layout.check(page)), layout.check(page)
    page.goto(f"{demo.url}/runs/{demo.run_ids[0]}")
    page.add_style_tag(content=".charts { grid-template-columns: 1fr }")  # nothing sticks out: the charts stack
    assert layout.check(page) == []
    moved = layout.diff("run", 1440, layout.describe(page))
    assert "-    figure.chart[Gradient norm] right" in moved, moved
    assert "+    figure.chart[Gradient norm] below full" in moved, moved


def test_runs_list_names_gate_metrics_search_and_compare(demo, page):
    from kollm.pipeline.history import list_runs

    first, second = demo.run_ids[:2]
    c = mlflow_client(demo.dir)
    name = c.get_run(first).info.run_name
    page.goto(f"{demo.url}/runs")
    row = page.locator(f'table.runs tr[data-run="{first}"]')
    assert row.locator("a.run-name").text_content() == name
    assert "gate passed" in row.text_content()
    ppl = step_run(demo.dir, first, "evaluate").data.metrics["perplexity"]
    assert f"perplexity={ppl:.4g}" in row.text_content() and "cpt.lr=0.003" in row.text_content()
    failed = [r for r in list_runs(demo.dir) if r.status == "FAILED"]
    if failed:  # test_a_failed_runs_unrun_steps_are_skipped ran first: its gate failure is said
        assert "gate failed" in page.locator(f'table.runs tr[data-run="{failed[0].run_id}"]').text_content()
    page.fill("input[name=q]", c.get_run(second).info.run_name)
    page.click("form.runs-search button")
    assert page.locator("table.runs tbody tr").evaluate_all("els => els.map(e => e.dataset.run)") == [second]
    page.goto(f"{demo.url}/runs")
    page.check(f'tr[data-run="{first}"] input[name=run]')
    page.check(f'tr[data-run="{second}"] input[name=run]')
    page.click("#compare-form button[type=submit]")
    assert page.url.startswith(f"{demo.url}/compare?")
    assert page.locator('table.compare tr[data-metric="perplexity"]').count() == 1
    assert page.locator('table.compare tr[data-param="cpt.lr"]').text_content().count("0.003") == 2


def test_registry_versus_champion_and_a_rolled_back_canary_warns(demo, page):
    from kollm import registry

    c = mlflow_client(demo.dir)
    if "champion" not in {a for v in registry.list_versions("ui-demo", demo.dir) for a in v.aliases}:
        registry.promote("ui-demo", "2", "first champion", demo.dir)  # test_pages did not run first
    champion = registry.show("ui-demo", "champion", demo.dir).version
    other = "1" if champion == "2" else "2"
    c.set_model_version_tag("ui-demo", other, "kollm.rollout.result", "rolled_back")
    c.set_model_version_tag("ui-demo", other, "kollm.rollout.reason", "p95_ms 3100 > 2000")
    registry.set_alias("ui-demo", "challenger", other, reason="retry", project_dir=demo.dir)
    page.goto(f"{demo.url}/registry/ui-demo")
    page.fill("form.unlock input[name=api_key]", "ui-test-key")
    page.click("form.unlock button")
    assert "p95_ms 3100 > 2000" in page.locator("#challenger-warning").text_content()
    rows = page.locator("table.versus tbody tr[data-metric]")
    assert rows.count() >= 1 and page.locator('table.versus tr[data-metric="perplexity"]').count() == 1
    button = page.locator(".actions a.button", has_text=f"v{other}")
    assert "secondary" in button.get_attribute("class") and "anyway" in button.text_content()
    button.click()
    assert "canary rollout was rolled back" in page.locator("#promote-warning").text_content()
