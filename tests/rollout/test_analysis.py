"""Analysis expressions, verdicts, rollout settings and the state file."""

from __future__ import annotations

import json

import pytest

from kollm.errors import ConfigError
from kollm.rollout.analysis import Criterion, ProbeResult, Sample, analyse, parse_analysis, percentile
from kollm.rollout.state import Alert, RolloutSpec, RolloutState, RolloutStore, StepRecord, parse_duration, parse_steps

DEFAULT = parse_analysis("success_rate>=0.95,p95_ms<=2000")


def test_parse_the_default_and_spacing():
    assert DEFAULT == [Criterion("success_rate", ">=", 0.95), Criterion("p95_ms", "<=", 2000)]
    assert parse_analysis(" p99_ms < 500 , error_rate<=0.01 ") == [
        Criterion("p99_ms", "<", 500),
        Criterion("error_rate", "<=", 0.01),
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("success_rate>=0.95,", "condition 2 ('')"),
        ("succes_rate>=0.9", "did you mean 'success_rate'"),
        ("latency<=3", "known metrics"),
        ("success_rate=>0.9", "write >="),
        ("success_rate==1", "not supported"),
        ("p95_ms<=fast", "'fast' is not a number"),
        ("success_rate>=95", "write 0.95, not 95"),
        ("p95_ms<=-1", "cannot be negative"),
        ("p95_ms", "expected METRIC OP NUMBER"),
        ("p95_ms<=inf", "finite"),
    ],
)
def test_bad_expressions_name_the_problem(text, message):
    with pytest.raises(ConfigError, match="--analysis") as e:
        parse_analysis(text)
    assert message in str(e.value)


def test_percentile_interpolates():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile(list(range(1, 101)), 95) == pytest.approx(95.05)
    assert percentile([7], 95) == 7


def ok(n, ms=10.0):
    return [Sample(True, ms)] * n


def test_verdicts():
    assert analyse(DEFAULT, ok(20), min_requests=10).verdict == "pass"
    failing = analyse(DEFAULT, ok(14) + [Sample(False, 10)] * 6, min_requests=10)
    assert (
        failing.verdict == "fail" and failing.failed == ["success_rate>=0.95"] and failing.values["success_rate"] == 0.7
    )
    slow = analyse(DEFAULT, ok(10) + ok(10, 3000), min_requests=10)
    assert slow.verdict == "fail" and "p95_ms=" in slow.reason
    few = analyse(DEFAULT, [Sample(False, 10)] * 3, min_requests=10)
    assert few.verdict == "inconclusive" and "only 3" in few.reason  # too little evidence either way


def test_requests_still_running_past_the_latency_limit_count_as_slow():
    # a hung canary: nothing completes, but 12 requests have been running for 5 s
    hung = analyse(DEFAULT, [], min_requests=10, pending_ms=[5000.0] * 12)
    assert hung.verdict == "fail" and hung.values["p95_ms"] == 5000
    # requests still running but below every limit say nothing yet: not counted as fast
    fresh = analyse(DEFAULT, ok(10, 1500), min_requests=10, pending_ms=[5.0] * 100)
    assert fresh.requests == 10 and fresh.values["p50_ms"] == 1500


def test_probe_is_judged_without_traffic():
    crit = parse_analysis("success_rate>=0.95,probe_pass_rate>=0.8")
    bad = analyse(crit, [], min_requests=10, probe=ProbeResult(1, 4, ["x"]))
    assert bad.verdict == "fail" and bad.failed == ["probe_pass_rate>=0.8"]
    assert analyse(crit, ok(10), min_requests=10, probe=ProbeResult(4, 4)).verdict == "pass"


def test_spec_checks_and_option_names():
    assert parse_steps("20,40,60,80%") == [20, 40, 60, 80]
    assert parse_duration("2m") == 120 and parse_duration("500ms") == 0.5 and parse_duration("1.5h") == 5400
    with pytest.raises(ConfigError, match="--pause: '2 minutes' is not a duration"):
        parse_duration("2 minutes")
    with pytest.raises(ConfigError) as e:
        RolloutSpec.build(steps=[60, 40, 120], failure_limit=0)
    assert "--steps" in str(e.value) and "--failure-limit" in str(e.value)
    with pytest.raises(ConfigError, match="probe_pass_rate but no probe prompts"):
        RolloutSpec.build(analysis="probe_pass_rate>=0.5")
    spec = RolloutSpec.build()
    assert (spec.steps, spec.pause_s, spec.analysis, spec.failure_limit) == (
        [20, 40, 60, 80],
        120,
        "success_rate>=0.95,p95_ms<=2000",
        2,
    )


def test_state_round_trips_and_writes_atomically(tmp_path):
    store = RolloutStore(tmp_path / "rollouts")
    st = RolloutState(name="m/한국", stable_version="1", canary_version="2", spec=RolloutSpec.build(steps=[10, 50]))
    st.step, st.weight, st.failures = 1, 50.0, 1
    st.history.append(StepRecord(1, 10, 1.0, analyse(DEFAULT, ok(10), min_requests=1)))
    st.alerts.append(Alert(2.0, "롤백", delivered=False, error="ConnectError: refused"))
    store.save(st)
    assert [p.name for p in store.folder.iterdir()] == [store.path("m/한국").name]  # no temp files left
    assert store.path("m/한국").name.startswith("m_한국-") and store.path("kodemo").name == "kodemo.json"
    back = store.load("m/한국")
    assert back.to_json() == st.to_json()
    assert back.alerts == [Alert(2.0, "롤백", False, "ConnectError: refused")]
    saved = json.loads(store.path("m/한국").read_text())
    assert saved["alerts"] == [
        {"at": 2.0, "text": "롤백", "delivered": False, "error": "ConnectError: refused"}
    ]  # the file format is unchanged
    store.path("broken").write_text("{", encoding="utf-8")
    with pytest.raises(ConfigError, match="unreadable rollout state"):
        store.load("broken")
    assert json.loads(store.path("m/한국").read_text())["history"][0]["result"]["verdict"] == "pass"
