"""The shipped Prometheus rules: valid (promtool check rules), unit-tested (promtool test rules), every alert covered."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from kollm.monitor.prometheus import rule_files, scrape_config, write_config

from .conftest import PROMTOOL, needs_promtool

TESTS = sorted((Path(__file__).parent / "rules").glob("*.test.yml"))


def _alerts() -> set[str]:
    return {
        r["alert"]
        for f in rule_files()
        for g in yaml.safe_load(f.read_text())["groups"]
        for r in g["rules"]
        if "alert" in r
    }


def test_rules_ship_for_serving_rollout_training_and_drift():
    assert {f.name for f in rule_files()} == {"serving.yml", "rollout.yml", "training.yml", "drift.yml"}
    assert {
        "KollmHighErrorRate",
        "KollmHighLatency",
        "KollmSlowFirstToken",
        "KollmQueueBacklog",
        "KollmNoTraffic",
        "KollmCanaryAnalysisFailed",
        "KollmGPUMemoryHigh",
        "KollmTrainingLossNaN",
        "KollmTrainingLossStalled",
        "KollmDataDrift",
    } <= _alerts()


@needs_promtool
def test_promtool_check_rules_accepts_every_file():
    r = subprocess.run(
        [PROMTOOL, "check", "rules", *map(str, rule_files())], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_promtool_unit_tests_pass():
    r = subprocess.run([PROMTOOL, "test", "rules", *map(str, TESTS)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("SUCCESS") == len(TESTS)


@needs_promtool
def test_promtool_unit_tests_catch_a_broken_rule(tmp_path):
    """The unit tests can fail: raising the error-rate threshold above the injected 10% breaks them."""
    rules = tmp_path / "src" / "kollm" / "monitor" / "rules"
    rules.mkdir(parents=True)
    text = (
        (rule_files()[0].parent / "serving.yml")
        .read_text()
        .replace("kollm:request_error_ratio:rate5m > 0.05", "kollm:request_error_ratio:rate5m > 0.5")
    )
    (rules / "serving.yml").write_text(text)
    tests = tmp_path / "tests" / "monitor" / "rules"
    tests.mkdir(parents=True)
    (tests / "serving.test.yml").write_text((Path(__file__).parent / "rules" / "serving.test.yml").read_text())
    r = subprocess.run(
        [PROMTOOL, "test", "rules", str(tests / "serving.test.yml")], capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0 and "KollmHighErrorRate" in r.stdout + r.stderr


def test_every_alert_has_a_firing_unit_test():
    fired = set()
    for t in TESTS:
        for case in yaml.safe_load(t.read_text())["tests"]:
            fired |= {a["alertname"] for a in case.get("alert_rule_test", []) if a.get("exp_alerts")}
    assert _alerts() - fired == set()


@needs_promtool
def test_written_config_passes_promtool_check_config(tmp_path):
    path = write_config(
        tmp_path / "prom", ["kollm-serve=127.0.0.1:8000", "kollm-gateway=127.0.0.1:8001", "kollm-serve=127.0.0.1:8002"]
    )
    config = yaml.safe_load(path.read_text())
    assert config["scrape_configs"][0] == {
        "job_name": "kollm-serve",
        "static_configs": [{"targets": ["127.0.0.1:8000", "127.0.0.1:8002"]}],
    }
    assert sorted(p.name for p in (tmp_path / "prom" / "rules").iterdir()) == sorted(f.name for f in rule_files())
    r = subprocess.run([PROMTOOL, "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_bad_target_is_named():
    import pytest

    from kollm.errors import ConfigError

    with pytest.raises(ConfigError, match="JOB=HOST:PORT"):
        scrape_config(["127.0.0.1:8000"], [])


def test_a_job_name_the_target_down_alert_never_matches_is_refused(tmp_path):
    """`--target serve=...` was accepted although KollmTargetDown (up{job=~"kollm.*"}) never fires for job 'serve'."""
    import re
    import sys

    rules = yaml.safe_load((Path(rule_files()[0]).parent / "serving.yml").read_text())
    expr = next(r["expr"] for g in rules["groups"] for r in g["rules"] if r.get("alert") == "KollmTargetDown")
    selector = re.search(r'job=~"([^"]+)"', expr).group(1)  # Prometheus anchors the regex at both ends
    assert re.fullmatch(selector, "kollm-serve") and not re.fullmatch(selector, "serve")

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "kollm.cli",
            "monitor",
            "config",
            str(tmp_path / "prom"),
            "--target",
            "serve=127.0.0.1:8000",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "'serve'" in r.stderr and "KollmTargetDown" in r.stderr and "kollm-serve=127.0.0.1:8000" in r.stderr
    assert not (tmp_path / "prom").exists()
    assert scrape_config(["kollm-serve=127.0.0.1:8000"], [])
