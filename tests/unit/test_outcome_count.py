"""The outcome count of tests/support/outcomes.py: a run that reports fewer tests than it collected fails.

Each case runs a throwaway pytest, loaded with our tests/conftest.py, on a tiny suite, in one process or with two
xdist workers and `--dist loadfile` (what `make test` runs), so the guard is proved on pytest's own exit status.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.outcomes import count_problems
from tests.support.subpytest import run_pytest

NORMAL = {"test_normal.py": """
import pytest

@pytest.mark.parametrize("n", [1, 2, 3])
def test_counts(n):
    assert n

@pytest.mark.xfail(strict=True)
def test_known_bug():
    assert False
"""}

# Two items under one node id, as schemathesis' parametrize once made: xdist's loadfile schedules by node id.
TWINS = {
    "conftest.py": """
import pytest

class Twin(pytest.Item):
    def runtest(self):
        pass

class Twins(pytest.File):
    def collect(self):
        yield Twin.from_parent(self, name="twin")
        yield Twin.from_parent(self, name="twin")

def pytest_collect_file(parent, file_path):
    if file_path.name == "test_pair.twins":
        return Twins.from_parent(parent, path=file_path)
""",
    "test_pair.twins": "",
    "test_other.py": "def test_alone():\n    pass\n",
}

# An item run without a report (setup, call and teardown with logging off): collected, never counted.
LOST = {
    "conftest.py": """
import pytest
from _pytest.runner import runtestprotocol

@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    if item.name != "test_lost":
        return None
    runtestprotocol(item, nextitem=nextitem, log=False)
    return True
""",
    "test_lost.py": "def test_kept():\n    pass\n\ndef test_lost():\n    pass\n",
}

SKIPPING = {"test_skipping.py": """
import pytest

def test_runs():
    pass

def test_cannot_run_here():
    pytest.skip("no such tool here")
"""}

FIRST_FAILS = {"test_first_fails.py": "def test_a():\n    assert False\n\ndef test_b():\n    pass\n"}


def _run(tmp_path: Path, files: dict[str, str], *, workers: int, ci: bool = False,
         extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    loadfile = ["-n", str(workers), "--dist", "loadfile"] if workers else []
    return run_pytest(tmp_path, files, env={"CI": "true"} if ci else {}, args=[*extra, *loadfile])


WORKERS = pytest.mark.parametrize("workers", [0, 2], ids=["one-process", "xdist"])


@WORKERS
def test_a_run_that_reports_every_collected_test_passes(tmp_path: Path, workers: int) -> None:
    run = _run(tmp_path, NORMAL, workers=workers, ci=True)
    assert run.returncode == pytest.ExitCode.OK, run.stdout + run.stderr
    assert "3 passed, 1 xfailed" in run.stdout
    assert "outcome count" not in run.stdout


def test_two_items_with_one_node_id_fail_the_run(tmp_path: Path) -> None:
    run = _run(tmp_path, TWINS, workers=0)
    assert run.returncode == pytest.ExitCode.TESTS_FAILED, run.stdout + run.stderr
    assert "3 passed" in run.stdout  # one process runs both twins: only the shared node id is wrong
    assert "1 node id(s) shared by several collected items (xdist runs one of each; give each item its own name): " \
           "test_pair.twins::twin" in run.stdout


def test_a_collected_test_that_reports_nothing_fails_the_run(tmp_path: Path) -> None:
    run = _run(tmp_path, LOST, workers=0)
    assert run.returncode == pytest.ExitCode.TESTS_FAILED, run.stdout + run.stderr
    assert "1 passed" in run.stdout
    assert "2 tests collected, 1 reported an outcome; none at all for 1: " \
           "test_lost.py::test_lost" in run.stdout


def test_a_skip_fails_the_run_in_ci(tmp_path: Path) -> None:
    run = _run(tmp_path, SKIPPING, workers=0, ci=True)
    assert run.returncode == pytest.ExitCode.TESTS_FAILED, run.stdout + run.stderr
    assert "1 test(s) skipped in CI, where every test must run" in run.stdout
    assert "test_skipping.py::test_cannot_run_here" in run.stdout


def test_under_loadfile_workers_the_controller_counts_every_problem(tmp_path: Path) -> None:
    # The three suites in one xdist run (make test's two workers, --dist loadfile): the controller collects nothing
    # itself, so this proves it counts from the workers' collection and reports.
    files = {**TWINS, **LOST, **SKIPPING, "conftest.py": TWINS["conftest.py"] + LOST["conftest.py"]}
    run = _run(tmp_path, files, workers=2, ci=True)
    assert run.returncode == pytest.ExitCode.TESTS_FAILED, run.stdout + run.stderr
    assert "4 passed, 1 skipped" in run.stdout  # what pytest itself says: of 7 collected, one twin never ran
    assert "1 node id(s) shared by several collected items" in run.stdout
    assert "7 tests collected, 5 reported an outcome; none at all for 1: " \
           "test_lost.py::test_lost" in run.stdout
    assert "1 test(s) skipped in CI" in run.stdout


def test_a_skip_only_skips_outside_ci(tmp_path: Path) -> None:
    run = _run(tmp_path, SKIPPING, workers=0)
    assert run.returncode == pytest.ExitCode.OK, run.stdout + run.stderr
    assert "1 passed, 1 skipped" in run.stdout


def test_a_run_stopped_on_purpose_is_not_counted(tmp_path: Path) -> None:
    run = _run(tmp_path, FIRST_FAILS, workers=0, extra=("-x",))
    assert run.returncode == pytest.ExitCode.TESTS_FAILED, run.stdout + run.stderr
    assert "1 failed" in run.stdout
    assert "outcome count" not in run.stdout  # -x stopped it: test_b's missing outcome is no surprise


@pytest.mark.parametrize(("collected", "reports", "skipped", "expected"), [
    (["a", "b"], {"a": 1, "b": 1}, [], []),
    (["a", "a", "b"], {"a": 2, "b": 1}, [], ["1 node id(s) shared by several collected items"]),
    (["a", "a", "b"], {"a": 1, "b": 1}, [], ["1 node id(s) shared", "3 tests collected, 2 reported an outcome"]),
    (["a", "b"], {"a": 1}, [], ["2 tests collected, 1 reported an outcome; none at all for 1: b"]),
    (["a", "b"], {"a": 9}, [], ["2 tests collected, 1 reported an outcome; none at all for 1: b"]),  # a crash loop
    (["a", "b"], {"a": 1, "b": 1}, ["b"], ["1 test(s) skipped in CI"]),
], ids=["complete", "twins-both-ran", "twins-one-ran", "one-lost", "one-reported-again", "one-skipped"])
def test_count_problems(collected: list[str], reports: dict[str, int], skipped: list[str],
                        expected: list[str]) -> None:
    problems = count_problems(collected, reports, skipped)
    assert len(problems) == len(expected), problems
    for problem, start in zip(problems, expected, strict=True):
        assert problem.startswith(start), problem
    if len(expected) > 1:
        assert problems[1] == expected[1]  # no "none at all" when each id reported at least once


def test_only_the_first_ten_node_ids_are_named() -> None:
    (problem,) = count_problems([f"t{i}" for i in range(13)], {}, [])
    assert problem.endswith("t0, t1, t2, t3, t4, t5, t6, t7, t8, t9 and 3 more")


def test_a_worker_crash_counts_as_the_failure_xdist_reports_and_what_it_left_unrun_is_named(tmp_path: Path) -> None:
    crash = {"test_crash.py": "import os\n\ndef test_dies():\n    os._exit(3)\n\ndef test_lives():\n    pass\n"}
    run = _run(tmp_path, crash, workers=2, extra=("--max-worker-restart", "0"))
    assert run.returncode != pytest.ExitCode.OK, run.stdout + run.stderr
    assert "crashed while running 'test_crash.py::test_dies'" in run.stdout
    assert "2 tests collected, 1 reported an outcome; none at all for 1: test_crash.py::test_lives" in run.stdout
