"""`make test` runs the suite on pytest-xdist workers (`-n 2 --dist loadgroup`); this plugin decides what runs where.

Each worker is a session of its own, so each would build its own session fixtures. A module runs whole on one worker
(its module fixtures, such as a server, are built once), and the modules whose tests use an expensive session
fixture (SHARED: the Ray instance, the quickstart run) run on one worker per fixture.

The work units are handed out longest first, by the seconds each module took in a recorded run (DURATIONS,
tests/durations.json, when a module is in it) or else as estimated from its tests (SLOW_TEST_S for each marked
`slow`, FAST_TEST_S for each other); a worker gets its next unit only when it is about to start the last test of its
current one. The long units (the groups, the end-to-end modules) start side by side and the short ones fill in at the
end; xdist's own order is by number of tests, which handed the quickstart group (a few tests of minutes each) and
the Ray group out a third of the way through the run. `pytest --record-durations tests/durations.json` (with or
without xdist) writes the seconds of the modules it ran into that file, keeping the others.

xdist's own `xdist_group` markers do not group tests under this pytest (xdist renames `item._nodeid`, which pytest 9
no longer reads), so the workers write each module's group to a file the controller's scheduler reads.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

# the browser: Playwright's sync API keeps an event loop running in its thread while it is open, so the UI modules
# run together and their browser closes when they end (tests/ui/conftest.py: package scope), before any other
# module's asyncio.run on that worker
SHARED = {"ray_cluster": "ray", "quickstart_run": "quickstart", "browser": "ui"}
KEY = "kollm_xdist_groups"
DURATIONS = "tests/durations.json"  # under the rootdir
# a module missing from DURATIONS: its estimate per test (the slow ones: end-to-end runs of half a minute to minutes)
SLOW_TEST_S = 60.0
FAST_TEST_S = 1.0


def module_of(nodeid: str) -> str:
    return nodeid.split("::")[0]


def groups_of(items: list[pytest.Item]) -> dict[str, str]:
    """Each test module's work unit (by path): the group of the first SHARED fixture any of its tests uses, else the
    module itself."""
    groups: dict[str, str] = {}
    for item in items:
        module = module_of(item.nodeid)
        group = next((g for f, g in SHARED.items() if f in getattr(item, "fixturenames", ())), None)
        if group and groups.get(module, module) == module:
            groups[module] = group
        groups.setdefault(module, module)
    return groups


def load_durations(path: Path) -> dict[str, float]:
    """Seconds per test module (setup, call and teardown of its tests) from a recorded run; {} when there is none."""
    try:
        return {str(k): float(v) for k, v in json.loads(path.read_text(encoding="utf-8")).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def estimates_of(items: list[pytest.Item]) -> dict[str, float]:
    """Each test module's seconds as guessed from its tests' markers (for modules without a recorded time)."""
    guess: dict[str, float] = {}
    for item in items:
        module = module_of(item.nodeid)
        guess[module] = guess.get(module, 0.0) + (SLOW_TEST_S if item.get_closest_marker("slow") else FAST_TEST_S)
    return guess


def unit_weight(nodeids, durations: dict[str, float], estimates: dict[str, float]) -> float:
    """The estimated seconds of a work unit (its tests' node ids): the recorded seconds of each of its modules, else
    the module's estimate from its markers, else FAST_TEST_S per test."""
    tests: dict[str, int] = {}
    for nodeid in nodeids:
        tests[module_of(nodeid)] = tests.get(module_of(nodeid), 0) + 1
    return sum(durations.get(m, estimates.get(m, FAST_TEST_S * n)) for m, n in tests.items())


def longest_first(units: dict[str, dict], durations: dict[str, float], estimates: dict[str, float]) -> list[str]:
    """The work units' scopes, heaviest first (ties: as given)."""
    return sorted(units, key=lambda scope: -unit_weight(units[scope], durations, estimates))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--record-durations",
        metavar="FILE",
        default=None,
        help="write the seconds each test module took into FILE (JSON, merged with the modules already in it); "
        "tests/durations.json orders `make test`'s work units, longest first",
    )


class DurationRecorder:
    """Sums each module's setup, call and teardown seconds from the test reports (under xdist, on the controller)."""

    def __init__(self, path: Path):
        self.path = path
        self.seconds: dict[str, float] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        module = module_of(report.nodeid)
        self.seconds[module] = self.seconds.get(module, 0.0) + report.duration

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        # an interrupted run writes nothing: its last modules would count only the tests that ran
        if hasattr(session.config, "workerinput") or not self.seconds or exitstatus == pytest.ExitCode.INTERRUPTED:
            return
        merged = {**load_durations(self.path), **{m: round(s, 1) for m, s in self.seconds.items()}}
        self.path.write_text(json.dumps(dict(sorted(merged.items())), indent=1) + "\n", encoding="utf-8")


def _loadgroup(config: pytest.Config) -> bool:
    return config.pluginmanager.hasplugin("xdist") and config.getoption("dist", "no") == "loadgroup"


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("record_durations", None)
    if path and not hasattr(config, "workerinput"):
        config.pluginmanager.register(DurationRecorder(Path(path)), "kollm-duration-recorder")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """Controller: tell each worker where to write the groups."""
    config = node.config
    if _loadgroup(config):
        if not hasattr(config, "_kollm_groups_file"):
            config._kollm_groups_file = str(Path(tempfile.mkdtemp(prefix="kollm-xdist-")) / "groups.json")
        node.workerinput[KEY] = config._kollm_groups_file


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Worker: write each module's group and estimated seconds for the controller's scheduler."""
    target = getattr(config, "workerinput", {}).get(KEY)
    if not target:
        return
    found = {"groups": groups_of(items), "estimates": estimates_of(items)}
    tmp = f"{target}.{os.getpid()}"
    Path(tmp).write_text(json.dumps(found), encoding="utf-8")
    os.replace(tmp, target)  # every worker collects the same tests, so writes the same groups


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Controller: xdist's loadgroup scheduling, with each test's work unit its module's group, the units handed out
    longest first, each when its worker is about to start the last test it has."""
    if not _loadgroup(config):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleGroupScheduling(LoadScopeScheduling):
        found: dict[str, dict] | None = None
        ordered = False

        def _read(self) -> dict[str, dict]:
            if self.found is None:  # read once every worker has collected (schedule() runs after that)
                file = getattr(config, "_kollm_groups_file", None)
                self.found = json.loads(Path(file).read_text(encoding="utf-8")) if file else {}
            return self.found

        def _split_scope(self, nodeid: str) -> str:
            return self._read().get("groups", {}).get(module_of(nodeid), module_of(nodeid))

        def _assign_work_unit(self, node) -> None:
            if not self.ordered:  # the queue is complete by the first assignment (schedule() built it)
                durations = load_durations(config.rootpath / DURATIONS)
                estimates = self._read().get("estimates", {})
                for scope in longest_first(dict(self.workqueue), durations, estimates):
                    self.workqueue.move_to_end(scope)
                self.ordered = True
                self.log("work units, longest first:", list(self.workqueue))
            super()._assign_work_unit(node)

        def _reschedule(self, node) -> None:
            """xdist's, but a worker gets its next unit only with one test left (it needs the next test's id to
            start its last one), not two: a unit is not queued behind a long test while the other worker idles."""
            if node.shutting_down:
                return
            if not self.workqueue:
                node.shutdown()
                return
            if self._pending_of(self.assigned_work[node]) > 1:
                return
            self._assign_work_unit(node)

    return ModuleGroupScheduling(config, log)
