"""The suite's time budget, as a pytest plugin (tests/conftest.py loads it; tests/test_slow_guard.py tests it).

- `@pytest.mark.slow(reason="...")`: the reason (what makes the test slow, and its time) is mandatory; a `slow`
  marker without one fails collection, naming each test that has one (under pytest-xdist, as a collection error).
- A test whose call (its own body; the setup of fixtures it shares with other tests is not counted) takes more than
  `slow_test_limit_s` seconds (ini option, default 120) fails unless it is marked `slow` with a reason.
"""

from __future__ import annotations

import pytest

LIMIT_INI = "slow_test_limit_s"
DEFAULT_LIMIT_S = 120.0


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        LIMIT_INI,
        "a test whose call takes longer than this many seconds fails unless marked @pytest.mark.slow(reason=...)",
        default=str(DEFAULT_LIMIT_S),
    )


def _reason(item: pytest.Item) -> str | None:
    """The reason of the item's `slow` marker; "" when a marker has none; None when it is not marked slow."""
    marks = list(item.iter_markers("slow"))
    if not marks:
        return None
    reasons = [str(m.kwargs.get("reason") or (m.args[0] if m.args else "")).strip() for m in marks]
    return next((r for r in reasons if r), "")


def _no_reason(bad: list[str]) -> str:
    return (
        "@pytest.mark.slow needs a reason: what makes the test slow, and its time, e.g. "
        '@pytest.mark.slow(reason="trains the quickstart: 70 s on 2 cores"). Without one:\n  ' + "\n  ".join(bad)
    )


def _xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    bad = [item.nodeid for item in items if _reason(item) == ""]
    if bad and not _xdist_worker(config):
        raise pytest.UsageError(_no_reason(bad))


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """Under pytest-xdist a worker's UsageError reaches the controller as an internal error without its message: a
    worker reports a `slow` marker without a reason as the collection error of the module (or class) instead."""
    report = yield
    if _xdist_worker(collector.config) and report.passed:
        bad = [i.nodeid for i in report.result if isinstance(i, pytest.Item) and _reason(i) == ""]
        if bad:
            report.outcome = "failed"
            report.longrepr = _no_reason(bad)
            report.result = []
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    report = yield
    if report.when != "call" or not report.passed:
        return report
    limit = float(item.config.getini(LIMIT_INI))
    if call.duration > limit and _reason(item) is None:
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} took {call.duration:.1f} s, more than the suite's limit of {limit:g} s per test "
            f"({LIMIT_INI}): make it faster (share fixtures, shrink its data or steps, wait for readiness instead "
            'of sleeping), or mark it @pytest.mark.slow(reason="...") saying why it needs the time'
        )
    return report
