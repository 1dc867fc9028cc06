"""The live rollout page against a real gateway (uvicorn on 127.0.0.1, the real serving apps around a small fake
engine, real MLflow aliases): it follows the rollout without reloading, and pause and promote work end to end."""

from __future__ import annotations

from kollm.rollout import client as rollout_client
from kollm.rollout.api import attach_rollout
from kollm.serve.gateway import Arm, Gateway
from kollm.ui.app import create_app

from tests.rollout.conftest import Load, Server, free_port, serving_app, wait_for

from .conftest import DESKTOP, both_widths

KEY = "gateway-key"


def make_gateway(registered, project):
    name = registered.name
    stable = Arm(serving_app("1", name=name, api_key=KEY), version="1", model_name=name)
    canary = Arm(serving_app("2", name=name, api_key=KEY), version="2", model_name=name)
    gw = Gateway(stable, canary)
    attach_rollout(gw, project_dir=project, model_name=name, api_key=KEY)
    return gw


def status(url):
    return rollout_client.command("status", gateway=url, api_key=KEY)


def test_live_rollout_pause_resume_and_promote(registered, tmp_path, browser):
    gw = make_gateway(registered, tmp_path)
    with (
        Server(gw) as srv,
        Server(create_app(tmp_path, api_key=KEY, gateway=srv.url)) as ui,
        Server(create_app(tmp_path, gateway=srv.url)) as readonly,
    ):
        context = browser.new_context(viewport=DESKTOP)
        context.set_default_timeout(30_000)
        page = context.new_page()
        page.goto(f"{ui.url}/rollout")
        assert "No rollout started" in page.locator("main").text_content()
        page.evaluate("window.__stay = 1")
        with Load(srv.url, registered.name, threads=2, api_key=KEY) as load:
            rollout_client.start(
                registered.name,
                steps="10,20,30,40,50,60,70,80,90",
                pause="1s",
                min_requests=3,
                gateway=srv.url,
                api_key=KEY,
            )
            # the page picks the rollout up and its analysed windows as they come, without a reload
            page.locator("table.windows .v-pass").first.wait_for()
        # no more traffic: later windows are inconclusive and the rollout holds its step (the clicks below race nothing)
        assert load.result.failed == [], load.result.failed[:5]
        assert page.evaluate("window.__stay") == 1
        assert "success_rate=1" in page.locator("table.windows .v-pass").first.locator("xpath=../..").text_content()
        assert page.locator(".bar .canary").count() == 1
        assert "analysis success_rate>=0.95,p95_ms<=2000" in " ".join(
            page.locator(".rollout-state").text_content().split()
        )
        serving = page.locator('.serving tr[data-arm="canary"]').text_content()
        assert "v2" in serving and "100.0%" in serving  # from the gateway's /metrics
        # per arm over time: requests/s and latency between the page's samples of /metrics
        for title in ("Requests per second", "Mean latency"):
            chart = page.locator(f'figure.chart[data-metric="{title}"]')
            assert chart.locator('polyline[data-label="canary v2"]').count() == 1, title
            assert chart.locator('polyline[data-label="stable v1"]').count() == 1, title

        page.fill("form.unlock input[name=api_key]", KEY)
        page.click("form.unlock button")
        page.click("button:has-text('Pause')")
        page.locator("#rollout-status", has_text="paused").wait_for()
        assert status(srv.url)["rollout"]["status"] == "paused"
        both_widths(page, f"{ui.url}/rollout", "rollout-paused")

        page.evaluate("window.__stay = 2")
        rollout_client.command("resume", gateway=srv.url, api_key=KEY)  # from the command line: the page follows
        page.locator("#rollout-status", has_text="progressing").wait_for()
        assert page.evaluate("window.__stay") == 2

        # read-only UI: the gateway wants a key, so it shows the state saved in .kollm/rollouts/ and no buttons
        ro = context.new_page()
        ro.goto(f"{readonly.url}/rollout")
        assert "missing or wrong API key" in ro.locator(".error-msg").text_content()
        assert ro.locator("#rollout-status").text_content() in ("progressing", "paused")
        assert ro.locator(".actions").count() == 0
        ro.close()

        page.click("text=Promote now…")
        assert "Promote the canary now?" in page.locator("h1").text_content()
        assert status(srv.url)["rollout"]["status"] == "progressing"  # nothing happens before the confirmation
        page.click("button:has-text('Confirm promote')")
        page.locator("#rollout-status", has_text="promoted").wait_for()
        wait_for(lambda: registered.alias("champion") == "2", 10, "champion -> v2")
        assert registered.alias("previous") == "1"
        both_widths(page, f"{ui.url}/rollout", "rollout-promoted")
        drawn = arm_series(page)
        context.close()
    # the per-arm series outlive the UI: a new one, with the gateway gone, draws the same points from what was kept
    assert set(drawn) >= {"Requests per second/canary v2", "Requests per second/stable v1"}, drawn
    assert list((tmp_path / ".kollm" / "ui" / "arm-samples").glob(f"{registered.name}-*.jsonl"))
    with Server(create_app(tmp_path, gateway=f"http://127.0.0.1:{free_port()}")) as restarted:
        context = browser.new_context(viewport=DESKTOP)
        page = context.new_page()
        page.goto(f"{restarted.url}/rollout")
        assert page.locator("#rollout-status").text_content() == "promoted"  # from the saved state
        assert arm_series(page) == drawn
        context.close()


def arm_series(page) -> dict[str, str]:
    """{chart/curve: its points} of the rollout page's per-arm charts."""
    return page.evaluate(
        """() => Object.fromEntries([...document.querySelectorAll('figure.chart')].flatMap(f =>
             [...f.querySelectorAll('polyline.curve')].map(p => [f.dataset.metric + '/' + p.dataset.label,
                                                               p.getAttribute('points')])))"""
    )
