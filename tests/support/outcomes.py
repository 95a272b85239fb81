"""The outcome count: a run fails when pytest reports fewer tests than it collected.

Why: schemathesis once gave 28 items one node id, and xdist's `--dist loadfile` (what `make test` runs), which
schedules by node id, ran one of them; the run said "2077 passed" of 2104 collected, no error, no skip, green.
A test that never ran proved nothing, so the session fails when

- two collected items share a node id (a scheduler keyed on node ids cannot run both), or
- a collected item produced no outcome (a call report, or a setup that failed or skipped), or
- in CI (CI=true), a test skipped: a skip is not a pass, and CI is where every test must run.

It decides where every report arrives: in this process, or in the xdist controller (which sees the workers'
collections through `pytest_xdist_node_collection_finished`). A run stopped on purpose (-x, --maxfail,
--stepwise, --collect-only, Ctrl-C) is not counted. Registered by tests/conftest.py.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from typing import Any

import pytest

NAME = "relais-outcome-count"
SHOWN = 10  # node ids named in the message; the rest are counted
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


class OutcomeCount:
    """Collected node ids against the node ids that reported an outcome, decided at the end of the session."""

    def __init__(self, *, skips_fail: bool) -> None:
        self.skips_fail = skips_fail
        self.collected: list[str] | None = None
        self.reports: Counter[str] = Counter()  # node id -> outcome reports (a crashed item may report again)
        self.skipped: list[str] = []
        self.problems: list[str] = []

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        if not _is_xdist_controller(session.config):  # the controller collects nothing: its workers tell it
            self.collected = [item.nodeid for item in session.items]

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node: Any, ids: list[str]) -> None:
        # xdist already fails the run when two workers collect differently; one worker's list is the collection.
        if self.collected is None:
            self.collected = list(ids)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # One outcome an item: its call, or what kept the call from happening (a failed or skipped setup; a worker
        # that crashed, which xdist reports as a failure with when="???").
        if report.when == "call" or (report.when != "teardown" and report.outcome != "passed"):
            self.reports[report.nodeid] += 1
            if report.skipped and not hasattr(report, "wasxfail"):  # an xfail ran: it is not a skip
                self.skipped.append(report.nodeid)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        config = session.config
        if getattr(config, "workerinput", None) is not None or self.collected is None or _stopped_on_purpose(
                session, exitstatus):
            return
        self.problems = count_problems(self.collected, self.reports, self.skipped if self.skips_fail else [])
        if self.problems:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.problems:
            terminalreporter.write_sep("=", "outcome count: this run did not run every test it collected", red=True)
            for line in self.problems:
                terminalreporter.write_line(line)


def count_problems(collected: list[str], reports: Mapping[str, int], skipped: list[str]) -> list[str]:
    """What is wrong with a finished run, one line a problem; none when every collected item reported an outcome.

    `reports` counts outcome reports by node id; an id collected n times needs n of them (more, from an item
    a crashed worker left and a new one ran again, count as n)."""
    problems = []
    times = Counter(collected)
    shared = sorted(nodeid for nodeid, n in times.items() if n > 1)
    if shared:
        problems.append(f"{len(shared)} node id(s) shared by several collected items (xdist runs one of each; "
                        f"give each item its own name): {_names(shared)}")
    outcomes = sum(min(reports.get(nodeid, 0), n) for nodeid, n in times.items())
    if outcomes < len(collected):
        missing = [nodeid for nodeid in times if not reports.get(nodeid)]
        problems.append(f"{len(collected)} tests collected, {outcomes} reported an outcome"
                        + (f"; none at all for {len(missing)}: {_names(missing)}" if missing else ""))
    if skipped:
        problems.append(f"{len(skipped)} test(s) skipped in CI, where every test must run (install what the "
                        f"skip message asks for; .ci/run is the list): {_names(skipped)}")
    return problems


def _names(nodeids: list[str]) -> str:
    more = len(nodeids) - SHOWN
    return ", ".join(nodeids[:SHOWN]) + (f" and {more} more" if more > 0 else "")


def _is_xdist_controller(config: pytest.Config) -> bool:
    return config.pluginmanager.has_plugin("dsession")  # xdist's distributing session: only on the controller


def _stopped_on_purpose(session: pytest.Session, exitstatus: int) -> bool:
    option = session.config.option
    if exitstatus not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
        return True  # interrupted, internal or usage error, nothing collected: pytest already says so
    return bool(getattr(option, "collectonly", False) or getattr(option, "setuponly", False)
                or getattr(option, "setupplan", False) or getattr(option, "stepwise", False)
                or (exitstatus == pytest.ExitCode.TESTS_FAILED and getattr(option, "maxfail", 0)))


def register(config: pytest.Config) -> None:
    """Install the outcome count once per process (workers install it too; only the controller decides)."""
    if not config.pluginmanager.has_plugin(NAME):
        config.pluginmanager.register(OutcomeCount(skips_fail=CI), NAME)
