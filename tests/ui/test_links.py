"""Everything that names a step run, a pipeline run or an output links to it: an output's folder opens a page
listing its files (text files shown, nothing outside the folder served), and the forward lineage names its steps,
their pipeline runs, outputs and models as links. Checked in chromium over the session's demo project."""

from __future__ import annotations

from pathlib import Path

import httpx

from .test_pages import step_runs


def test_an_output_folder_opens_its_files(demo, page):
    steps = step_runs(demo.dir, demo.run_ids[0])
    prep = steps["prepare-corpus"]
    page.goto(f"{demo.url}/steps/{prep.info.run_id}")
    link = page.locator("a.output").first
    folder = Path(link.text_content().strip())
    name = folder.name
    assert folder.is_dir() and folder.parent.name == prep.data.tags["kollm.cache_key"]
    link.click()
    assert page.url == f"{demo.url}/steps/{prep.info.run_id}/outputs/{name}"
    # the page's digest is the step run's, and it lists exactly the folder's files
    assert page.locator("main a.digest").get_attribute("title") == prep.data.tags[f"kollm.output.{name}.digest"]
    listed = page.locator("table.output-files tr[data-file]").evaluate_all("els => els.map(e => e.dataset.file)")
    on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert sorted(listed) == on_disk and listed
    # a text file opens as text, byte for byte, sandboxed
    file_link = page.locator("table.output-files a").first
    rel = file_link.text_content().strip()
    r = httpx.get(f"{demo.url}{file_link.get_attribute('href')}")
    assert r.status_code == 200 and r.content == (folder / rel).read_bytes()
    assert r.headers["content-type"].startswith("text/plain") and r.headers["content-security-policy"].startswith(
        "sandbox"
    )
    # nothing outside the folder, no output the step does not have: 404 with what to do
    base = f"{demo.url}/steps/{prep.info.run_id}/outputs"
    for path in ("../step.json", "/etc/passwd", f"../{name}/{rel}"):
        assert httpx.get(f"{base}/{name}/file", params={"path": path}).status_code == 404, path
    missing = httpx.get(f"{base}/no-such-output")
    assert missing.status_code == 404 and "has no output &#39;no-such-output&#39;" in missing.text
    assert f"its outputs: {name}" in missing.text  # the hint names the ones it has


def test_forward_lineage_links_steps_runs_outputs_and_models(demo, page):
    steps = step_runs(demo.dir, demo.run_ids[0])
    dataset = steps["prepare-corpus"].data.tags["kollm.output.dataset.digest"]
    cpt = steps["cpt"]
    page.goto(f"{demo.url}/lineage?digest={dataset}")
    row = page.locator(f'tr[data-step="{cpt.info.run_id}"]')
    assert row.locator("a.step").text_content() == "cpt"
    assert row.locator("a.step").get_attribute("href") == f"/steps/{cpt.info.run_id}"
    assert row.locator("a.run").get_attribute("href") == f"/runs/{demo.run_ids[0]}"
    assert row.locator("a.output").get_attribute("href") == f"/steps/{cpt.info.run_id}/outputs/model"
    assert page.locator("table.fwd-versions a", has_text="ui-demo").first.get_attribute("href") == "/registry/ui-demo"
    row.locator("a.step").click()
    assert page.url == f"{demo.url}/steps/{cpt.info.run_id}"
    assert page.locator("h1").text_content().startswith("cpt")
