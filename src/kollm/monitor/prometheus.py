"""The Prometheus rules and Grafana dashboards kollm ships, and a Prometheus config to scrape kollm with them.

Public API:
    RULES_DIR, DASHBOARDS_DIR            the shipped files (package data)
    rule_files() -> list[Path]           rules/*.yml: serving, rollout, training, drift
    dashboard_files() -> list[Path]      dashboards/*.json
    scrape_config(targets, rule_paths, scrape_interval, evaluation_interval) -> str   a prometheus.yml
    write_config(out_dir, targets, ...) -> Path   copy the rules and dashboards to out_dir and write prometheus.yml

Targets are `JOB=HOST:PORT` pairs; the rules expect job names starting with "kollm" (kollm-serve,
kollm-gateway, kollm-monitor for `kollm monitor exporter`).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import yaml

from kollm.errors import ConfigError

RULES_DIR = Path(__file__).parent / "rules"
DASHBOARDS_DIR = Path(__file__).parent / "dashboards"
_TARGET = re.compile(r"^(?P<job>[A-Za-z_][A-Za-z0-9_\-]*)=(?P<addr>[^\s/=]+:\d+)$")


def rule_files() -> list[Path]:
    return sorted(RULES_DIR.glob("*.yml"))


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS_DIR.glob("*.json"))


def parse_targets(targets: list[str]) -> dict[str, list[str]]:
    """["kollm-serve=127.0.0.1:8000", ...] -> {"kollm-serve": ["127.0.0.1:8000"], ...}. ConfigError on a bad one."""
    jobs: dict[str, list[str]] = {}
    for t in targets:
        m = _TARGET.match(t.strip())
        if not m:
            raise ConfigError(f"--target {t!r}: expected JOB=HOST:PORT, e.g. kollm-serve=127.0.0.1:8000")
        if not m.group("job").startswith("kollm"):  # the rules select jobs with up{job=~"kollm.*"}
            raise ConfigError(
                f"--target {t!r}: job name {m.group('job')!r} does not start with 'kollm', so the KollmTargetDown "
                f"alert would never fire for it; name it e.g. kollm-{m.group('job')}={m.group('addr')}"
            )
        jobs.setdefault(m.group("job"), []).append(m.group("addr"))
    return jobs


def scrape_config(
    targets: list[str], rule_paths: list[str], *, scrape_interval: str = "15s", evaluation_interval: str = "15s"
) -> str:
    """A prometheus.yml scraping `targets` (JOB=HOST:PORT) and loading `rule_paths`."""
    jobs = parse_targets(targets)
    config = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": evaluation_interval},
        "rule_files": rule_paths,
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": addrs}]} for job, addrs in jobs.items()],
    }
    return yaml.safe_dump(config, sort_keys=False)


def write_config(
    out_dir: Path, targets: list[str], *, scrape_interval: str = "15s", evaluation_interval: str = "15s"
) -> Path:
    """Copy rules/*.yml and dashboards/*.json into out_dir and write out_dir/prometheus.yml; returns its path."""
    out_dir = Path(out_dir)
    parse_targets(targets)  # a bad target is named before anything is written
    (out_dir / "rules").mkdir(parents=True, exist_ok=True)
    (out_dir / "dashboards").mkdir(parents=True, exist_ok=True)
    for f in rule_files():
        shutil.copyfile(f, out_dir / "rules" / f.name)
    for f in dashboard_files():
        shutil.copyfile(f, out_dir / "dashboards" / f.name)
    path = out_dir / "prometheus.yml"
    path.write_text(
        scrape_config(
            targets, ["rules/*.yml"], scrape_interval=scrape_interval, evaluation_interval=evaluation_interval
        ),
        encoding="utf-8",
    )
    return path
