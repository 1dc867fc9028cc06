"""tests/xdist_groups.py: under `make test`'s pytest-xdist workers, the modules that use an expensive session fixture
share one worker (so the fixture is built once), and every other module runs whole on one worker."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

# no:langsmith_plugin: as the suite's addopts (pyproject.toml), which pytester's own folder does not read
XDIST = ("-p", "tests.xdist_groups", "-p", "no:langsmith_plugin", "-n", "2", "--dist", "loadgroup")


def test_modules_sharing_a_session_fixture_run_on_one_worker(pytester: pytest.Pytester, monkeypatch):
    pytest.importorskip("xdist")
    root = str(Path(__file__).resolve().parent.parent)  # the workers import tests.xdist_groups from this checkout
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    log = pytester.path / "log"
    log.mkdir()
    pytester.makeconftest(
        f"""
        import os
        import pytest

        LOG = {str(log)!r}

        def record(name):
            with open(os.path.join(LOG, name), "a") as f:
                f.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")

        @pytest.fixture(scope="session")
        def ray_cluster():
            record("ray_cluster-built")

        @pytest.fixture(scope="module")
        def server(request):
            record(request.module.__name__ + "-server-built")
        """
    )
    uses_ray = "def test_{0}{1}(ray_cluster, request):\n    pass\n"
    for m in ("a", "b"):  # b: only one of its tests asks for the fixture; its other test goes along
        body = "".join(uses_ray.format(m, i) for i in range(3 if m == "a" else 1))
        pytester.makepyfile(**{f"test_{m}": body + f"def test_{m}_plain():\n    pass\n"})
    for m in ("c", "d", "e"):
        pytester.makepyfile(**{f"test_{m}": "".join(f"def test_{m}{i}(server):\n    pass\n" for i in range(3))})
    r = pytester.runpytest_subprocess(*XDIST, "-v")
    r.assert_outcomes(passed=15)
    worker = {}
    for line in r.stdout.lines:  # "[gw0] [ 6%] PASSED test_a.py::test_a0"
        if "PASSED" in line and "::" in line:
            worker[line.split()[-1].split("::")[0]] = worker.get(line.split()[-1].split("::")[0], set()) | {
                line.split()[0]
            }
    assert all(len(w) == 1 for w in worker.values()), worker  # a module on one worker
    assert worker["test_a.py"] == worker["test_b.py"], worker  # the Ray modules on the same one
    assert len((log / "ray_cluster-built").read_text().split()) == 1  # so the session fixture is built once
    for m in ("c", "d", "e"):
        assert len((log / f"test_{m}-server-built").read_text().split()) == 1


def test_make_test_runs_two_loadgroup_workers_and_the_dev_extra_has_xdist():
    """The README's Tests section: `make test` runs `-n 2 --dist loadgroup`, TEST_WORKERS=0 runs one process."""
    import re
    import tomllib

    root = Path(__file__).resolve().parent.parent
    makefile = (root / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^TEST_WORKERS \?= 2$", makefile, re.M)
    target = makefile.split("\ntest: install\n", 1)[1].split("\n", 1)[0]
    assert "-n $(TEST_WORKERS) --dist loadgroup" in target and "--durations=30" in target
    dev = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"][
        "dev"
    ]
    assert any(d.startswith("pytest-xdist") for d in dev)


def test_ci_runs_the_checks_the_main_suite_and_the_vllm_suite():
    """The README's Tests section: `.ci/run` runs `make check`, builds the Airflow environment, then `make test`,
    `make test-airflow` and `make test-vllm` (in that order, every command checked: `set -e`)."""
    root = Path(__file__).resolve().parent.parent
    lines = [x.strip() for x in (root / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    assert "set -euo pipefail" in lines
    make = [x.split("#")[0].strip() for x in lines if x.startswith("make ")]
    assert make == ["make check", "make airflow-env", "make test", "make test-airflow", "make test-vllm"]


def _run_with_module_log(pytester: pytest.Pytester, monkeypatch, *args: str) -> tuple[pytest.RunResult, list[str]]:
    """Run pytester's modules on two loadgroup workers; returns the result and "WORKER MODULE" per test, in the order
    the tests started."""
    root = str(Path(__file__).resolve().parent.parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    log = pytester.path / "started"
    pytester.makeconftest(
        f"""
        import os
        import pytest

        @pytest.fixture(autouse=True)
        def started(request):
            with open({str(log)!r}, "a") as f:
                f.write(os.environ["PYTEST_XDIST_WORKER"] + " " + request.module.__name__ + "\\n")
        """
    )
    r = pytester.runpytest_subprocess(*XDIST, *args)
    return r, log.read_text().splitlines()


def test_units_are_handed_out_longest_first_and_record_durations_writes_their_seconds(
    pytester: pytest.Pytester, monkeypatch
):
    """xdist alone hands out the modules with the most tests first (here test_many, then test_long). Here the two
    longest start first, one on each worker: test_long by tests/durations.json, test_mid (not in it) by its test
    marked slow (SLOW_TEST_S), ahead of test_many's eight quick tests. The same run writes the seconds of the modules
    it ran with --record-durations, keeping the modules it did not run."""
    pytest.importorskip("xdist")
    pytester.makepyfile(
        test_long="import time\ndef test_l():\n    time.sleep(0.3)\n",
        test_many="".join(f"def test_m{i}():\n    pass\n" for i in range(8)),
        test_mid="import pytest\n@pytest.mark.slow(reason='r')\ndef test_d():\n    pass\n",
    )
    (pytester.path / "tests").mkdir()
    (pytester.path / "tests" / "durations.json").write_text('{"test_long.py": 90, "test_many.py": 20}')
    out = pytester.path / "recorded.json"
    out.write_text('{"test_gone.py": 7.0, "test_mid.py": 99.0}')
    r, started = _run_with_module_log(pytester, monkeypatch, "--record-durations", str(out))
    r.assert_outcomes(passed=10)
    first: dict[str, str] = {}
    for worker, module in map(str.split, started):
        first.setdefault(worker, module)
    assert sorted(first.values()) == ["test_long", "test_mid"], started  # each worker began with a long one
    recorded = json.loads(out.read_text())
    assert set(recorded) == {"test_gone.py", "test_long.py", "test_many.py", "test_mid.py"}, recorded
    assert recorded["test_gone.py"] == 7.0 and 0.3 <= recorded["test_long.py"] < 10 and recorded["test_mid.py"] < 10


def test_make_test_airflow_runs_the_whole_quickstart_test_and_make_test_skips_it():
    """`make test-airflow` selects the whole-quickstart Airflow test by its node id and turns it on
    (KOLLM_AIRFLOW_QUICKSTART=1), with Airflow's environment built first; without that variable it skips."""
    import re

    root = Path(__file__).resolve().parent.parent
    makefile = (root / "Makefile").read_text(encoding="utf-8")
    head, recipe = makefile.split("\ntest-airflow: ", 1)[1].split("\n", 1)
    assert "install" in head.split() and "$(AIRFLOW_VENV)/.kollm-airflow-installed" in head.split()
    recipe = re.split(r"\n(?!\t)", recipe, maxsplit=1)[0].replace("\\\n", " ")
    assert "KOLLM_AIRFLOW_QUICKSTART=1" in recipe and "-n " not in recipe
    (node,) = re.findall(r'"(tests/[^"]+)"', recipe)
    from tests.deploy import test_airflow

    test = getattr(test_airflow, node.split("::")[1])
    (skip,) = [m for m in test.pytestmark if m.name == "skipif"]  # `make test` has no KOLLM_AIRFLOW_QUICKSTART
    assert (
        skip.args == (os.environ.get("KOLLM_AIRFLOW_QUICKSTART") != "1",)
        and "make test-airflow" in skip.kwargs["reason"]
    )
