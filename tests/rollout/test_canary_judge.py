"""The canary judge (judge_win_rate in a rollout's analysis): a sample of the canary's real chat requests in each
window is answered again by both arms and judged pairwise, both orders, by a judge endpoint on 127.0.0.1, at most
`max_calls` judge calls a window. The rig is test_controller's (real gateway, serving apps, admin API, registry;
ManualClock); the judge is tests/eval/test_judge.py's scripted HTTP server (the winner is the answer that contains
GOOD; a question carrying [malformed] gets unparseable verdicts). kollm serve as a judge: tests/steps/test_evaluate_judge.py."""

from __future__ import annotations

import asyncio
import json
import random
import re
from pathlib import Path
from types import SimpleNamespace as NS

import pytest

from kollm.errors import ConfigError
from kollm.rollout import client as rollout_client
from kollm.rollout.analysis import JudgeWindow, analyse, parse_analysis
from kollm.rollout.state import RolloutSpec
from kollm.serve.window import PromptSample
from tests.eval.test_judge import FakeJudge

from .test_controller import CHAT, running

ANALYSIS = "success_rate>=0.9,judge_win_rate>=0.5"


@pytest.fixture(scope="module")
def fake_judge():
    server = FakeJudge()
    yield server
    server.server.shutdown()
    server.server.server_close()


def judge_spec(fake: FakeJudge, **kw) -> dict:
    return {"base_url": fake.url, "model": "fake", "max_calls": 4, "backoff": 0.01, "max_retries": 1, **kw}


async def ask(rig, n: int, *, arm: str = "canary", content: str = "서울의 날씨는 어때요?") -> None:
    headers = {"x-kollm-canary": {"canary": "always", "stable": "never"}[arm]}
    rs = await asyncio.gather(
        *(
            rig.http.post(
                CHAT,
                headers=headers,
                json={"model": rig.name, "messages": [{"role": "user", "content": f"{content} {i}"}], "max_tokens": 4},
            )
            for i in range(n)
        )
    )
    assert all(r.status_code == 200 for r in rs)


def test_a_better_canary_wins_the_judge_and_is_promoted_within_the_call_cap(registered, tmp_path, webhook, fake_judge):
    async def scenario() -> None:
        async with running(registered, tmp_path) as rig:
            rig.engines["2"].tokens = ["v2", " GOOD"]  # the judge prefers the answer containing GOOD
            await rig.start(
                steps=[50, 100],
                min_requests=3,
                analysis=ANALYSIS,
                judge=judge_spec(fake_judge),
                alert_webhook=webhook.url,
            )
            fake_judge.hits.clear()
            await ask(rig, 6, content="제 번호는 010-1234-5678 입니다.")
            await ask(rig, 5, arm="stable")  # the stable arm's requests are neither analysed nor sampled
            canary_calls = len(rig.engines["2"].calls)
            await rig.window()
            first = rig.state.history[0]
            assert first.result.verdict == "pass", first.result.reason
            v = first.result.values
            assert (v["judge_win_rate"], v["judge_pairs"], v["judge_calls"]) == (1.0, 2.0, 4.0)
            assert sum(fake_judge.hits.values()) == 4  # max_calls=4: two sampled requests, each judged in both orders
            assert first.result.requests == 6  # the judge's re-asks bypass the gateway: not counted as traffic
            assert len(rig.engines["2"].calls) == canary_calls + 2  # each sampled request answered again by each arm
            assert "2 won, 0 tied, 0 lost of 2 pairs (2 of 6 canary chat requests sampled" in first.note
            assert [j["outcome"] for j in first.judged] == ["win", "win"]
            assert all("<PHONE>" in j["question"] and "010-1234" not in j["question"] for j in first.judged)
            assert all(j["canary"] == "v2 GOOD" and j["stable"] == "v1 답변" for j in first.judged)
            assert all(len(j["reasons"]) == 2 and all(j["reasons"]) for j in first.judged)
            await ask(rig, 4)
            await rig.window()
            assert rig.verdicts() == ["pass", "pass"] and rig.state.status == "promoted"
            shown = rollout_client.format_status(
                {
                    "gateway": {"model": rig.name, "stable_version": "2", "canary_version": None, "canary_weight": 0},
                    "rollout": rig.state.to_json(),
                }
            )
            assert "judge_win_rate=1" in shown
            gateway = (await rig.http.get("/admin/rollout/status")).json()["gateway"]
        saved = rig.saved()
        assert saved["history"][0]["judged"][0]["outcome"] == "win"  # the verdicts and reasons are kept in the state
        assert saved["step"] == 2 and saved["step_index"] == 1  # "step 2/2" in the text output
        assert json_keys({"rollout": saved, "gateway": gateway}) <= documented_status_fields()

    asyncio.run(scenario())


def json_keys(d, skip=("values", "judged", "probe", "rubric")) -> set[str]:
    """Every key in a status document (not the keys of metric maps or the judge's free-form records)."""
    out: set[str] = set()
    items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else []
    for k, v in items:
        if isinstance(k, str):
            out.add(k)
            if k in skip:
                continue
        out |= json_keys(v, skip)
    return out


def documented_status_fields() -> set[str]:
    """The backticked names in the README's bullet on `kollm rollout status --json`."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    bullet = readme.split("- `kollm rollout status --json`", 1)[1].split("\n- ", 1)[0]
    return set(re.findall(r"`([a-z_]+)`", bullet))


def test_a_worse_canary_loses_the_judge_and_is_rolled_back(registered, tmp_path, webhook, fake_judge):
    async def scenario() -> None:
        async with running(registered, tmp_path) as rig:
            rig.engines["1"].tokens = ["v1", " GOOD"]  # the champion's answers are the better ones
            await rig.start(
                steps=[50],
                min_requests=3,
                failure_limit=1,
                analysis=ANALYSIS,
                judge=judge_spec(fake_judge, max_calls=6),
                alert_webhook=webhook.url,
            )
            await ask(rig, 8)
            await rig.window()
            result = rig.state.history[0].result
            assert result.verdict == "fail" and result.failed == ["judge_win_rate>=0.5"]
            assert (result.values["judge_win_rate"], result.values["judge_pairs"]) == (0.0, 3.0)
            assert rig.state.status == "rolled_back" and rig.gw.weight == 0
        assert "judge_win_rate" in registered.tags("2")["kollm.rollout.failed_analysis"]

    asyncio.run(scenario())


def test_unparseable_verdicts_are_counted_and_leave_the_window_inconclusive(registered, tmp_path, fake_judge):
    async def scenario() -> None:
        async with running(registered, tmp_path) as rig:
            await rig.start(steps=[50], min_requests=3, analysis=ANALYSIS, judge=judge_spec(fake_judge))
            await ask(rig, 5, content="[malformed] 질문")
            await rig.window()
            result = rig.state.history[0].result
            assert result.verdict == "inconclusive" and rig.state.failures == 0
            assert "no judged pair among 2 sampled canary request(s) (4 unparseable verdict(s)" in result.reason
            assert result.values["judge_parse_failures"] == 4 and "judge_win_rate" not in result.values
            await ask(rig, 0)
            await rig.window()  # a window without canary traffic samples nothing and makes no judge call
            assert rig.state.history[1].result.values["judge_calls"] == 0

    asyncio.run(scenario())


def test_judge_settings_are_checked_before_anything_is_sent():
    with pytest.raises(ConfigError, match="judge_win_rate but no judge was given"):
        RolloutSpec.build(analysis="judge_win_rate>=0.5")
    with pytest.raises(ConfigError, match="fraction between 0 and 1"):
        parse_analysis("judge_win_rate>=50")
    with pytest.raises(ConfigError, match="--judge-calls: "):
        rollout_client.start(
            "m", analysis="judge_win_rate>=0.5", judge_url="http://127.0.0.1:1/v1", judge_model="j", judge_calls=1
        )
    with pytest.raises(ConfigError, match="--judge-url and --judge-model go together"):
        rollout_client.start("m", judge_url="http://127.0.0.1:1/v1")


def test_a_missing_judge_key_variable_is_refused_at_start(registered, tmp_path, fake_judge, monkeypatch):
    monkeypatch.delenv("KOLLM_TEST_JUDGE_KEY", raising=False)

    async def scenario() -> None:
        async with running(registered, tmp_path) as rig:
            r = await rig.http.post(
                "/admin/rollout/start",
                json={
                    "name": rig.name,
                    "analysis": ANALYSIS,
                    "judge": judge_spec(fake_judge, api_key_env="KOLLM_TEST_JUDGE_KEY"),
                },
            )
            assert r.status_code == 400 and "KOLLM_TEST_JUDGE_KEY is not set" in r.json()["error"]["message"]
            assert rig.controller.state is None

    asyncio.run(scenario())


def test_the_prompt_sample_is_bounded_and_uniform():
    random.seed(7)
    counts = [0] * 20
    for _ in range(2000):
        sample = PromptSample(capacity=5)
        for i in range(20):
            sample.offer(str(i).encode())
        assert len(sample.bodies) == 5 and sample.seen == 20
        for b in sample.bodies:
            counts[int(b)] += 1
    assert all(400 < c < 600 for c in counts), counts  # each request kept with probability 5/20 (expected 500)
    big = PromptSample(capacity=5)
    big.offer(b"x" * (64 * 1024 + 1))
    assert big.bodies == [] and big.seen == 0


def test_analysis_without_judged_pairs_is_inconclusive_and_with_them_judged():
    crit = parse_analysis("judge_win_rate>=0.5")
    assert analyse(crit, [], min_requests=0, judge=JudgeWindow(wins=1, ties=2, losses=1)).verdict == "pass"
    assert analyse(crit, [], min_requests=0, judge=JudgeWindow(ties=1, losses=2)).values[
        "judge_win_rate"
    ] == pytest.approx(1 / 6, abs=1e-4)
    assert analyse(crit, [], min_requests=0, judge=JudgeWindow(sampled=3, request_failures=6)).verdict == "inconclusive"


def test_status_json_counts_steps_from_one_and_old_state_files_still_load(tmp_path):
    from kollm.rollout.state import RolloutState, RolloutStore
    from kollm.ui.data import saved_rollouts

    spec = RolloutSpec.build(steps=[20, 40, 60, 80])
    st = RolloutState(name="m", stable_version="1", canary_version="2", spec=spec, step=3, weight=80)
    doc = st.to_json()
    assert (doc["step"], doc["step_index"]) == (4, 3)  # as the text says: "step 4/4"
    assert "step 4/4" in rollout_client.format_status(
        {"gateway": {"model": "m", "stable_version": "1", "canary_version": "2", "canary_weight": 80}, "rollout": doc}
    )
    assert RolloutState.from_json(doc).step == 3
    old = {k: v for k, v in doc.items() if k != "step_index"} | {"step": 3}  # written before step_index existed
    assert RolloutState.from_json(old).step == 3
    store = RolloutStore(tmp_path / ".kollm" / "rollouts")
    store.folder.mkdir(parents=True)
    store.path("m").write_text(json.dumps(old))
    project = NS(state=tmp_path / ".kollm")
    assert [(s["step"], s["step_index"]) for s in saved_rollouts(project)] == [(4, 3)]
