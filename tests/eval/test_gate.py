"""Gate rules: parsing, absolute and relative decisions, explanations."""

from __future__ import annotations

import pytest

from kollm.eval.gate import decide, parse_rule


def rules(*texts):
    return [parse_rule(t) for t in texts]


def test_parse_rules():
    r = parse_rule("perplexity <= 40")
    assert (r.metric, r.op, r.threshold, r.alias) == ("perplexity", "<=", 40.0, None)
    r = parse_rule(" chrf >= champion + 1.5 ")
    assert (r.metric, r.op, r.alias, r.adjust_op, r.adjust, r.text) == (
        "chrf",
        ">=",
        "champion",
        "+",
        1.5,
        "chrf >= champion + 1.5",
    )
    r = parse_rule("kobest_boolq.acc > 0.6")
    assert r.metric == "kobest_boolq.acc" and r.threshold == 0.6
    assert parse_rule("perplexity<champion*0.98").bound(50.0) == pytest.approx(49.0)
    assert parse_rule("nll <= -1e-3").threshold == -0.001
    for bad in ["perplexity", "perplexity = 40", "<= 40", "perplexity <= forty percent", "perplexity <= champion / 2"]:
        with pytest.raises(ValueError, match="METRIC OP BOUND"):
            parse_rule(bad)


def test_absolute_pass_and_fail():
    gate = rules("perplexity <= 40", "contains >= 0.85")
    ok = decide(gate, {"perplexity": 39.9, "contains": 0.85}, {})
    assert ok.passed and [o.status for o in ok.outcomes] == ["pass", "pass"]
    bad = decide(gate, {"perplexity": 52.3, "contains": 0.9}, {})
    assert not bad.passed and [o.status for o in bad.outcomes] == ["fail", "pass"]
    assert "perplexity = 52.3, needs <= 40" in bad.outcomes[0].reason
    text = bad.explain("gate of step 'evaluate'")
    assert text.splitlines()[0] == "gate of step 'evaluate' FAILED:"
    assert "FAIL  perplexity <= 40" in text and "PASS  contains >= 0.85" in text
    assert bad.to_json()["passed"] is False and bad.to_json()["reasons"][0].startswith("FAIL: ")


def test_missing_metric_fails():
    d = decide(rules("exact >= 0.5"), {"perplexity": 3.0}, {})
    assert not d.passed and "produced no 'exact'" in d.outcomes[0].reason


def test_relative_rules_against_the_champion():
    gate = rules("perplexity <= champion - 0.5", "chrf >= champion")
    champion = {"perplexity": 30.0, "chrf": 40.0}
    better = decide(gate, {"perplexity": 29.0, "chrf": 41.0}, {"champion": champion})
    assert better.passed
    assert better.outcomes[0].bound == 29.5 and better.outcomes[0].reference == 30.0
    within_margin = decide(gate, {"perplexity": 29.8, "chrf": 41.0}, {"champion": champion})
    assert not within_margin.passed
    assert "perplexity = 29.8, champion = 30 -> needs <= 29.5" in within_margin.outcomes[0].reason
    worse = decide(gate, {"perplexity": 20.0, "chrf": 39.0}, {"champion": champion})
    assert [o.status for o in worse.outcomes] == ["pass", "fail"]


def test_relative_rule_without_champion_is_skipped_or_required():
    gate = rules("perplexity <= 40", "perplexity <= champion")
    first = decide(gate, {"perplexity": 10.0}, {"champion": None})
    assert first.passed and first.outcomes[1].status == "skip" and "no 'champion'" in first.outcomes[1].reason
    strict = decide(gate, {"perplexity": 10.0}, {"champion": None}, require_reference=True)
    assert not strict.passed


def test_a_metric_that_needs_a_reference_is_skipped_or_required():
    gate = rules("judge_win_rate >= 0.5", "judge_score >= 5")
    why = {"judge_win_rate": "no 'champion' model registered yet to compare answers with"}
    first = decide(gate, {"judge_score": 6.0}, {"champion": None}, unavailable=why)
    assert first.passed and first.outcomes[0].status == "skip" and first.outcomes[0].reason == why["judge_win_rate"]
    strict = decide(gate, {"judge_score": 6.0}, {"champion": None}, require_reference=True, unavailable=why)
    assert not strict.passed and strict.outcomes[0].status == "fail"
    assert not decide(gate, {"judge_score": 6.0}, {}).passed  # missing for another reason: a failure
