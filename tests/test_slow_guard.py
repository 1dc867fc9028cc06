"""tests/slow_guard.py, the suite's time budget: a slow test must say why, and a test over the limit must be
marked slow. Run in pytester's own folder with the limit lowered to 0.5 s (the suite's is 120 s)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

# no:langsmith_plugin: as the suite's addopts (pyproject.toml), which pytester's own folder does not read
FAST_LIMIT = ["-p", "tests.slow_guard", "-o", "slow_test_limit_s=0.5", "-p", "no:langsmith_plugin"]


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeini("[pytest]\nmarkers =\n    slow(reason): slow\n")
    return pytester


def test_a_test_over_the_limit_fails_unless_marked_slow_with_a_reason(suite):
    suite.makepyfile(
        """
        import time
        import pytest

        def test_fast():
            pass

        def test_over():
            time.sleep(0.8)

        @pytest.mark.slow(reason="sleeps past the limit on purpose")
        def test_over_marked():
            time.sleep(0.8)

        def test_over_and_failing():
            time.sleep(0.8)
            assert False, "its own failure"
        """
    )
    r = suite.runpytest(*FAST_LIMIT)
    r.assert_outcomes(passed=2, failed=2)
    r.stdout.fnmatch_lines(["*::test_over took 0.8 s, more than the suite's limit of 0.5 s per test*"])
    # the summary line carries the message when the terminal is wide enough (CI's is), so match either form
    r.stdout.re_match_lines([r"FAILED .*::test_over( - .*)?$", r"FAILED .*::test_over_and_failing( - .*)?$"])
    assert "its own failure" in r.stdout.str()  # a test that fails anyway keeps its own report


def test_the_default_limit_is_120_s(suite):
    assert float(suite.parseconfigure("-p", "tests.slow_guard").getini("slow_test_limit_s")) == 120


@pytest.mark.parametrize("marker", ["@pytest.mark.slow", '@pytest.mark.slow(reason="  ")', "@pytest.mark.slow()"])
def test_a_slow_marker_without_a_reason_fails_collection(suite, marker):
    suite.makepyfile(
        f"""
        import pytest

        {marker}
        def test_no_reason():
            pass

        @pytest.mark.slow(reason="has one")
        def test_with_reason():
            pass
        """
    )
    r = suite.runpytest(*FAST_LIMIT)
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    err = r.stderr.str()
    assert "@pytest.mark.slow needs a reason" in err and "::test_no_reason" in err and "test_with_reason" not in err


def test_a_module_level_slow_marker_with_a_reason_covers_its_tests(suite):
    suite.makepyfile(
        """
        import time
        import pytest

        pytestmark = pytest.mark.slow(reason="every test here sleeps")

        def test_over():
            time.sleep(0.8)
        """
    )
    suite.runpytest(*FAST_LIMIT).assert_outcomes(passed=1)


def test_under_xdist_as_make_test_runs_it(suite, monkeypatch):
    """`make test` runs the suite on pytest-xdist workers: a test over the limit still fails there, the slowest
    tests are still listed, and a `slow` marker without a reason is a collection error that names the test."""
    pytest.importorskip("xdist")
    root = str(Path(__file__).resolve().parent.parent)  # the workers import tests.slow_guard from this checkout
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    suite.makepyfile(
        test_timed="""
        import time
        import pytest

        def test_fast():
            pass

        def test_over():
            time.sleep(0.8)

        @pytest.mark.slow(reason="sleeps past the limit on purpose")
        def test_over_marked():
            time.sleep(0.8)
        """
    )
    xdist = [
        *FAST_LIMIT,
        "-n",
        "1",
        "--dist",
        "loadgroup",
        "--durations=2",
    ]  # one worker: its reports reach the controller
    r = suite.runpytest_subprocess(*xdist)
    r.assert_outcomes(passed=2, failed=1)
    r.stdout.fnmatch_lines(["*::test_over took 0.8 s, more than the suite's limit of 0.5 s per test*"])
    r.stdout.fnmatch_lines(["*slowest 2 durations*", "0.8*s call*test_over*", "0.8*s call*test_over*"])
    suite.makepyfile(
        test_bare="""
        import pytest

        @pytest.mark.slow
        def test_no_reason():
            pass
        """
    )
    r = suite.runpytest_subprocess(*xdist)
    assert r.ret != 0
    r.stdout.fnmatch_lines(
        ["*ERROR collecting test_bare.py*", "*@pytest.mark.slow needs a reason*", "*::test_no_reason"]
    )
