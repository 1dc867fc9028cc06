"""Real pieces for the UI tests: the tiny pipeline run once per session by `kollm run` in its own process, the UI
app on uvicorn at 127.0.0.1, and Debian's chromium driven by playwright. Screenshots go to build/ui-screenshots/."""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import KOLLM
from tests.rollout.conftest import Server, registered, tracking_uri  # noqa: F401  (fixtures for the rollout test)
from tests.ui import layout
from tests.ui.project import make_project

from kollm.ui.app import create_app

KEY = "ui-test-key"
SHOTS = Path(__file__).resolve().parents[2] / "build" / "ui-screenshots"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
WIDE = {"width": 1440, "height": 900}


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="package")
def browser():
    """Chromium through Playwright's sync API, for the tests of this package: closed when they end, because the
    sync API keeps an event loop running in this thread while it is open (asyncio.run elsewhere would fail)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    exe = chromium_path()
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium fonts-noto-cjk)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport=DESKTOP, locale="ko-KR")
    context.set_default_timeout(20_000)
    pg = context.new_page()
    yield pg
    context.close()


def shoot(pg, name: str) -> Path:
    """A full-page screenshot kept as a test artifact."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    pg.screenshot(path=str(path), full_page=True)
    return path


def both_widths(pg, url: str, name: str, stored: bool = False) -> None:
    """Screenshots at 1440x900 and 390x844, each checked by the layout check (tests/ui/layout.py: nothing outside
    its container or the viewport, nothing clipped; wide tables and graphs scroll inside boxes marked to) and, with
    `stored`, compared with the stored layout tests/ui/layouts/NAME.json."""
    for size in (WIDE, PHONE):
        pg.set_viewport_size(size)
        pg.goto(url)
        shoot(pg, f"{name}-{size['width']}")
        assert layout.check(pg) == [], (url, size)
        if stored:
            layout.compare(name, size["width"], layout.describe(pg))
    pg.set_viewport_size(DESKTOP)


@dataclass
class Demo:
    """The session's project after two pipeline runs (the second forces `register`: versions 1 and 2)."""

    dir: Path
    url: str  # the UI with the API key
    readonly_url: str  # the same project, UI without a key
    run_ids: list[str] = field(default_factory=list)  # oldest first
    observed: dict = field(default_factory=dict)  # what the browser saw while the first run was in progress


def _kollm(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([KOLLM, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="package")
def demo(tmp_path_factory, browser):
    """Runs the pipeline while the UI is open in the browser (recording what the live pages showed), then once
    more with `--force register`."""
    project = make_project(tmp_path_factory.mktemp("ui") / "demo")
    with Server(create_app(project, api_key=KEY)) as ui, Server(create_app(project)) as ro:
        d = Demo(project, ui.url, ro.url)
        context = browser.new_context(viewport=DESKTOP)
        context.set_default_timeout(30_000)
        pg = context.new_page()
        pg.goto(f"{ui.url}/runs", timeout=180_000)  # the first page creates the MLflow tables: slow on a busy machine
        t0 = time.monotonic()
        proc = _kollm(["run", "--quiet"], project)
        try:
            # the runs list picks the new run up by itself (no reload), marked RUNNING
            pg.locator("table.runs .s-running").first.wait_for(timeout=90_000)
            d.observed["seen_running_after_s"] = time.monotonic() - t0
            pg.locator("table.runs a").first.click()
            d.observed["run_url"] = pg.url
            pg.evaluate("window.__notReloaded = true")
            # while it runs, the graph shows steps that have not started yet, or one at work
            d.observed["statuses_while_running"] = pg.eval_on_selector_all(
                "svg.dag.h g.node", "els => els.map(e => e.dataset.status)"
            )
            shoot(pg, "run-in-progress-1280")
            pg.locator("h1 .s-finished").wait_for(timeout=180_000)
            d.observed["seen_finished_after_s"] = time.monotonic() - t0
            d.observed["reloaded"] = pg.evaluate("window.__notReloaded !== true")
            d.observed["statuses_after"] = pg.eval_on_selector_all(
                "svg.dag.h g.node", "els => els.map(e => e.dataset.status)"
            )
        finally:
            out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
        d.observed["run_exited_after_s"] = time.monotonic() - t0
        context.close()
        import kollm

        # in this process: version 2 (another register config, so another key: registering is idempotent per key),
        # every other step a cache hit
        kollm.run(project, force=["register"], overrides={"register.description": "second registration"})
        from kollm.pipeline.history import list_runs

        d.run_ids = [r.run_id for r in reversed(list_runs(project))]
        yield d
