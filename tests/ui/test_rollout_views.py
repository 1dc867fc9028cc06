"""The rollout page's decision aids over a rollout state saved in `.kollm/rollouts/` (the gateway is down: the UI
shows what it saved): the step timeline, the failing-analysis badge, each condition against its threshold, alert
text with its emoji; and a project without rollouts never shows another project's gateway."""

from __future__ import annotations

import json
import time

from kollm.rollout.analysis import AnalysisResult
from kollm.rollout.api import attach_rollout
from kollm.serve.gateway import Arm, Gateway
from kollm.rollout.state import RolloutSpec, RolloutState, StepRecord
from kollm.ui.app import create_app
from kollm.ui.data import conditions, emoji

from tests.rollout.conftest import Server, free_port, serving_app
from tests.ui.project import make_project

from . import layout
from .conftest import PHONE, both_widths, shoot


def saved_state(project):
    spec = RolloutSpec.build(steps=[10, 25, 50], analysis="success_rate>=0.95,p95_ms<=2000", pause_s=30)
    now = time.time()
    window = lambda v, p95, n: AnalysisResult(v, n, {"success_rate": v == "pass" and 1.0 or 0.5, "p95_ms": p95}, [], "")  # noqa: E731
    st = RolloutState(name="ui-demo", stable_version="1", canary_version="2", spec=spec, step=1, weight=25, failures=1)
    st.history = [
        StepRecord(1, 10, now - 60, window("pass", 120.0, 40)),
        StepRecord(2, 25, now - 5, window("fail", 3100.0, 38)),
    ]
    st.message = "step 2: analysis failed (1/3)"
    from kollm.rollout.state import Alert

    st.alerts = [Alert(now - 4, ":rotating_light: kollm rollout of ui-demo: analysis failed", True)]
    folder = project / ".kollm" / "rollouts"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ui-demo.json").write_text(json.dumps(st.to_json()), encoding="utf-8")


def test_timeline_failing_badge_thresholds_and_emoji(tmp_path, browser):
    project = make_project(tmp_path / "p")
    saved_state(project)
    with Server(create_app(project, gateway=f"http://127.0.0.1:{free_port()}")) as ui:
        context = browser.new_context()
        pg = context.new_page()
        pg.goto(f"{ui.url}/rollout")
        assert pg.locator("#rollout-status").text_content() == "progressing"
        assert "analysis failing" in pg.locator("#analysis-failing").text_content()
        steps = pg.locator("ol.timeline li")
        assert steps.count() == 3
        assert [steps.nth(i).get_attribute("class") for i in range(3)] == ["t-done", "t-now", "t-next"]
        assert "fail" in steps.nth(1).text_content() and "pass" in steps.nth(0).text_content()
        p95 = pg.locator('table.conditions tr[data-metric="p95_ms"]').text_content()
        assert "<= 2000" in p95 and "3100" in p95 and "breached" in p95
        assert "breached" in pg.locator('table.conditions tr[data-metric="success_rate"]').text_content()
        alert = pg.locator(".rollout-state ul li").first.text_content()
        assert "🚨" in alert and ":rotating_light:" not in alert
        both_widths(pg, f"{ui.url}/rollout", "rollout-failing", stored=True)
        context.close()


def test_conditions_and_emoji():
    rows = conditions("success_rate>=0.95, p95_ms<=2000,probe_pass_rate>=1", {"success_rate": 0.9, "p95_ms": 10})
    assert [(r["metric"], r["ok"]) for r in rows] == [
        ("success_rate", False),
        ("p95_ms", True),
        ("probe_pass_rate", None),
    ]
    assert emoji(":white_check_mark: done :unknown_code:") == "✅ done :unknown_code:"


def test_an_empty_project_does_not_show_another_projects_gateway(tmp_path, browser):
    """A gateway serving a model this project never registered (another project's) is not this project's rollout."""
    project = make_project(tmp_path / "empty")
    name = "someone-elses-model"
    gw = Gateway(Arm(serving_app("1", name=name), version="1", model_name=name))
    attach_rollout(gw, project_dir=tmp_path / "other", model_name=name)
    with Server(gw) as other:
        with Server(create_app(project, gateway=other.url)) as ui:
            context = browser.new_context()
            pg = context.new_page()
            pg.goto(f"{ui.url}/rollout")
            text = pg.locator("main").text_content()
            assert "someone-elses-model" in pg.locator(".error-msg").text_content()
            assert "not a registered model of this project" in text
            assert pg.locator(".weights").count() == 0 and pg.locator(".serving table").count() == 0
            context.close()


def test_a_small_canary_share_keeps_its_label_at_phone_width(demo, browser, tmp_path):
    """The traffic bar with 5 % to the canary, on a phone: each part shows its whole label (the canary's was cut off
    to a few letters) and nothing else on the page breaks the layout check."""
    arms = [Arm(serving_app(v, name="ui-demo"), version=v, model_name="ui-demo") for v in ("1", "2")]
    gw = Gateway(*arms)
    gw.set_weight(5)
    attach_rollout(gw, project_dir=tmp_path, model_name="ui-demo")
    with Server(gw) as gateway, Server(create_app(demo.dir, gateway=gateway.url)) as ui:
        context = browser.new_context(viewport=PHONE)
        pg = context.new_page()
        pg.goto(f"{ui.url}/rollout")
        assert pg.locator(".bar .canary").text_content() == "canary 5%"
        assert layout.check(pg) == []
        shoot(pg, "rollout-weights-390")
        context.close()
