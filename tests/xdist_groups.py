"""`make test` runs the suite on pytest-xdist workers (`-n 2 --dist loadgroup`); this plugin decides what runs where.

Each worker is a session of its own, so each would build its own session fixtures. A module runs whole on one worker
(its module fixtures, such as a server, are built once), and the modules whose tests use an expensive session
fixture (SHARED: the Ray instance, the quickstart run) run on one worker per fixture; those groups are handed out
first, so they run side by side from the start instead of ending the run.

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


def _loadgroup(config: pytest.Config) -> bool:
    return config.pluginmanager.hasplugin("xdist") and config.getoption("dist", "no") == "loadgroup"


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
    """Worker: the SHARED groups first (the scheduler hands out work units in collection order), then write them."""
    target = getattr(config, "workerinput", {}).get(KEY)
    if not target:
        return
    groups = groups_of(items)
    order = {g: i for i, g in enumerate(SHARED.values())}
    items.sort(key=lambda it: order.get(groups[module_of(it.nodeid)], len(order)))  # stable: else as collected
    tmp = f"{target}.{os.getpid()}"
    Path(tmp).write_text(json.dumps(groups), encoding="utf-8")
    os.replace(tmp, target)  # every worker collects the same tests, so writes the same groups


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Controller: xdist's loadgroup scheduling, with each test's work unit its module's group."""
    if not _loadgroup(config):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleGroupScheduling(LoadScopeScheduling):
        groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:  # read once every worker has collected (schedule() runs after that)
                file = getattr(config, "_kollm_groups_file", None)
                self.groups = json.loads(Path(file).read_text(encoding="utf-8")) if file else {}
            return self.groups.get(module_of(nodeid), module_of(nodeid))

    return ModuleGroupScheduling(config, log)
