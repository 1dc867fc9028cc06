"""`kollm ui` in a real browser (Debian's chromium through playwright) over a real project: MLflow on SQLite,
runs made by `kollm run` in its own process, the registry moved by clicking through the confirmation pages. The
screenshots and layout checks of these pages at both widths are test_views.test_layout_at_phone_and_desktop_width."""

from __future__ import annotations

import json
import subprocess

import httpx
import pytest

from kollm import registry
from kollm.errors import ConfigError
from kollm.pipeline.tracking import client_for, tracking_uri
from kollm.ui import check_bind

from .conftest import KEY, PHONE, shoot


def mlflow_client(project):
    return client_for(tracking_uri(project))


def step_runs(project, pipeline_run_id):
    c = mlflow_client(project)
    runs = c.search_runs(
        [c.get_run(pipeline_run_id).info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{pipeline_run_id}'"
    )
    return {r.data.tags["kollm.step"]: r for r in runs}


def test_pages_update_while_the_run_is_in_progress(demo):
    seen = demo.observed
    assert {"RUNNING", "PENDING"} & set(seen["statuses_while_running"]), seen
    assert not seen["reloaded"]  # the page changed by itself, not by a reload
    assert set(seen["statuses_after"]) == {"DATA", "FINISHED"}, seen


def test_runs_list(demo, page):
    page.goto(f"{demo.url}/runs")
    rows = page.locator("table.runs tbody tr")
    assert rows.count() == 2
    newest, oldest = rows.nth(0), rows.nth(1)
    assert newest.get_attribute("data-run") == demo.run_ids[1]
    cells = [c.text_content() for c in newest.locator("td").all()]
    assert cells[2] == "FINISHED" and cells[3] == "4" and cells[4] == "3"  # only the forced register ran again
    assert oldest.locator("td").nth(4).text_content() == "0"
    assert oldest.locator("td").nth(5).text_content().endswith("s")  # a duration


def test_run_page_graph_metrics_and_loss_curve(demo, page):
    first = demo.run_ids[0]
    steps = step_runs(demo.dir, first)
    page.goto(f"{demo.url}/runs/{first}")
    nodes = page.locator("svg.dag.h g.node")
    assert sorted(nodes.evaluate_all("els => els.map(e => e.dataset.node)")) == sorted(
        ["data.corpus", "data.suite", "prepare-corpus", "cpt", "evaluate", "register"]
    )
    cpt = page.locator('svg.dag.h g.node[data-node="cpt"]')
    key = steps["cpt"].data.tags["kollm.cache_key"]
    assert key[:8] in cpt.text_content() and "computed" in cpt.text_content() and "loss" in cpt.text_content()
    ppl = steps["evaluate"].data.metrics["perplexity"]
    assert f"perplexity {ppl:.4g}" in page.locator('svg.dag.h g.node[data-node="evaluate"]').text_content()
    # edges: one per input: corpus -> prepare -> cpt, {prepare, cpt, suite} -> evaluate, {evaluate, cpt} -> register
    assert page.locator("svg.dag.h path.edge").count() == 7
    row = page.locator('table.steps tr[data-step="cpt"]')
    assert steps["cpt"].data.tags["kollm.output.model.digest"].removeprefix("sha256:")[:12] in row.text_content()
    assert "miss" in row.text_content()
    # the loss curve is cpt's MLflow metric history: 12 steps logged every 2
    curve = page.locator('svg.chart polyline[data-label="cpt: loss"]')
    points = curve.get_attribute("points").split()
    history = mlflow_client(demo.dir).get_metric_history(steps["cpt"].info.run_id, "loss")
    assert len(points) == len(history) == 6

    page.goto(f"{demo.url}/runs/{demo.run_ids[1]}")
    cached = page.locator('svg.dag.h g.node[data-node="cpt"]').text_content()
    assert "cache hit" in cached
    assert page.locator('table.steps tr[data-step="register"]').text_content().count("hit") == 0
    # a cached training step's curve comes from its training log
    assert page.locator('svg.chart polyline[data-label="cpt: loss"]').count() == 1


def test_step_page_config_digests_reports_logs(demo, page):
    steps = step_runs(demo.dir, demo.run_ids[0])
    cpt = steps["cpt"]
    page.goto(f"{demo.url}/steps/{cpt.info.run_id}")
    text = page.locator("main").text_content()
    assert json.loads(page.locator("pre.config").text_content())["max_steps"] == 12  # the resolved config
    data_digest = cpt.data.tags["kollm.input.data.digest"]
    assert data_digest.removeprefix("sha256:")[:12] in text and "prepare-corpus.dataset" in text
    assert cpt.data.tags["kollm.cache_key"] in text
    assert '"loss"' in page.locator("pre.log").last.text_content()  # the training log
    assert "step_finished" in page.locator("pre.log").first.text_content()  # the runner's events for this step

    prep = steps["prepare-corpus"]
    page.goto(f"{demo.url}/steps/{prep.info.run_id}")
    link = page.locator("a.report", has_text="prepare/report.html")
    with page.context.expect_page() as report_page:
        link.click()
    report = report_page.value
    report.wait_for_load_state()
    assert report.title() == "kollm prepare: prepare-corpus" and "문서 번호" in report.content()  # the prepare report
    assert httpx.get(f"{demo.url}{link.get_attribute('href')}").headers["content-security-policy"].startswith("sandbox")
    evaluate = steps["evaluate"]
    page.goto(f"{demo.url}/steps/{evaluate.info.run_id}")
    href = page.locator("a.report", has_text="evaluation/report.html").get_attribute("href")
    assert "Quality gate: PASSED" in httpx.get(f"{demo.url}{href}").text
    assert (
        httpx.get(f"{demo.url}/steps/{evaluate.info.run_id}/artifact", params={"path": "../../etc/passwd"}).status_code
        == 404
    )
    missing = httpx.get(f"{demo.url}/steps/no-such-run")
    assert missing.status_code == 404 and "no MLflow run" in missing.text


def test_lineage_back_to_raw_data_and_forward_to_versions(demo, page):
    steps = step_runs(demo.dir, demo.run_ids[0])
    raw = steps["prepare-corpus"].data.tags["kollm.input.source.digest"]
    dataset = steps["prepare-corpus"].data.tags["kollm.output.dataset.digest"]
    page.goto(f"{demo.url}/lineage/ui-demo/2")
    assert page.locator('tr[data-source="prepare-corpus.source"] a.digest').get_attribute("title") == raw
    assert page.locator('tr[data-dataset="prepare-corpus.dataset"] a.digest').get_attribute("title") == dataset
    nodes = page.locator("svg.dag.h g.node").evaluate_all("els => els.map(e => e.dataset.node)")
    assert f"data:{raw}" in nodes and "cpt" in nodes and "version:2" in nodes

    page.locator('tr[data-source="prepare-corpus.source"] a.digest').click()  # forward from the raw corpus
    assert page.url.startswith(f"{demo.url}/lineage?digest=")
    assert sorted(
        page.locator("table.fwd-versions tr[data-version]").evaluate_all("els => els.map(e => e.dataset.version)")
    ) == ["ui-demo/1", "ui-demo/2"]
    assert "prepare-corpus" in page.locator("main").text_content()
    page.goto(f"{demo.url}/lineage?digest=sha256:{'0' * 64}")
    assert "no step run read or wrote" in page.locator(".error-msg").text_content()


def test_registry_read_only_refuses_changes(demo, page):
    page.goto(f"{demo.readonly_url}/registry")
    assert page.url.endswith("/registry/ui-demo")  # one model: straight to it
    assert "read-only" in page.locator("header").text_content()
    assert page.locator("a.button").count() == 0 and page.locator("form.unlock").count() == 0
    r = httpx.post(
        f"{demo.readonly_url}/registry/ui-demo/promote", data={"version": "2", "reason": "x", "api_key": KEY}
    )
    assert r.status_code == 403 and "read-only" in r.text
    r = httpx.post(f"{demo.url}/registry/ui-demo/promote", data={"version": "2", "reason": "x", "api_key": "wrong"})
    assert r.status_code == 403 and "wrong or missing API key" in r.text
    assert "champion" not in [a for v in registry.list_versions("ui-demo", demo.dir) for a in v.aliases]


def test_registry_promote_and_rollback_with_confirmation(demo, page):
    page.goto(f"{demo.url}/registry/ui-demo")
    assert page.locator("tr[data-version]").evaluate_all("els => els.map(e => e.dataset.version)") == ["2", "1"]
    assert "challenger" in page.locator('tr[data-version="2"]').text_content()
    assert "passed" in page.locator('tr[data-version="2"]').text_content()  # the gate result
    page.fill("form.unlock input[name=api_key]", KEY)
    page.click("form.unlock button")
    assert "actions unlocked" in page.locator("header").text_content()

    page.click("text=Promote challenger v2…")
    assert "Promote v2 of ui-demo?" in page.locator("h1").text_content()  # the confirmation page
    assert registry.show("ui-demo", "challenger", demo.dir).version == "2"  # nothing moved yet
    page.fill("input[name=reason]", "카나리 분석 통과: 승격합니다")
    page.click("button:has-text('Confirm promote')")
    assert page.url.endswith("/registry/ui-demo")
    assert registry.show("ui-demo", "champion", demo.dir).version == "2"
    audit = page.locator("table.audit tbody tr").first.text_content()
    assert "카나리 분석 통과: 승격합니다" in audit and "promote" in audit

    page.click('tr[data-version="1"] >> text=promote…')
    page.fill("input[name=reason]", "v1로 되돌려 비교")
    page.click("button:has-text('Confirm promote')")
    assert registry.show("ui-demo", "champion", demo.dir).version == "1"
    assert registry.show("ui-demo", "previous", demo.dir).version == "2"

    page.click("text=Roll back to v2…")
    page.fill("input[name=reason]", "지연 시간이 너무 깁니다")
    page.click("button:has-text('Confirm rollback')")
    assert registry.show("ui-demo", "champion", demo.dir).version == "2"
    assert "rolled back" in page.locator('tr[data-version="1"]').text_content()
    history = page.locator("table.audit tbody").text_content()
    assert "지연 시간이 너무 깁니다" in history and "rollback" in history
    assert [e.reason for e in registry.audit_trail("ui-demo", demo.dir)][-1] == "지연 시간이 너무 깁니다"


def test_korean_text_renders_with_a_korean_font(demo, page):
    """The audit reasons are Korean: the glyphs come from a CJK font (Noto Sans CJK), not boxes."""
    registry.set_alias("ui-demo", "reviewed", "1", reason="검토 완료: 한국어 사유입니다", project_dir=demo.dir)
    page.goto(f"{demo.url}/registry/ui-demo")
    assert page.locator("table.audit tbody tr td.reason").first.text_content() == "검토 완료: 한국어 사유입니다"
    cdp = page.context.new_cdp_session(page)
    cdp.send("DOM.enable")
    cdp.send("CSS.enable")
    root = cdp.send("DOM.getDocument", {"depth": -1})["root"]["nodeId"]
    node = cdp.send("DOM.querySelector", {"nodeId": root, "selector": "table.audit tbody tr td.reason"})["nodeId"]
    fonts = cdp.send("CSS.getPlatformFontsForNode", {"nodeId": node})["fonts"]
    families = [f["familyName"] for f in fonts]
    assert any("CJK" in f or "KR" in f for f in families), families
    page.set_viewport_size(PHONE)
    shoot(page, "registry-korean-390")


def test_kollm_ui_command(demo):
    """`kollm ui` serves the project; without a key it refuses any address but loopback, with one clear message."""
    import os
    import time

    from tests.conftest import KOLLM
    from tests.rollout.conftest import free_port

    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", "some-key")
    with pytest.raises(ConfigError, match="without an API key the UI is read-only"):
        check_bind("0.0.0.0", None)
    env = {k: v for k, v in os.environ.items() if k != "KOLLM_API_KEY"}
    r = subprocess.run(
        [KOLLM, "ui", "--project", str(demo.dir), "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 2 and "listens on 127.0.0.1 only" in r.stderr and "Traceback" not in r.stderr

    # started from the project's folder; it says it is ready once it listens and has warmed what the first page
    # needs (the issue measured 3.7-6.3 s for the first page before): a browser's first page, redirect and
    # stylesheet included, answers within 1 s of that line
    port = free_port()
    proc = subprocess.Popen(
        [KOLLM, "ui", "--port", str(port)],
        cwd=demo.dir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        before = []  # what it printed before (warnings, MLflow's log lines)
        for ready in proc.stdout:
            if ready.startswith("kollm ui for"):
                break
            before.append(ready)
        else:
            raise AssertionError(f"`kollm ui` ended without saying it was ready:\n{''.join(before)}")
        assert f"http://127.0.0.1:{port}" in ready, ready
        t0 = time.monotonic()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            page = client.get("/", follow_redirects=True)
            css = client.get("/static/style.css")
        first_page_s = time.monotonic() - t0
        assert page.status_code == 200 and css.status_code == 200 and str(page.url).endswith("/runs")
        assert demo.run_ids[0] in page.text and "read-only" in page.text
        assert first_page_s < 1.0, f"the first page took {first_page_s:.2f}s after `kollm ui` said it was ready"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
