"""The supervisor's pure decisions: which children `relais run` starts, backoff, exit codes."""

from __future__ import annotations

import pytest

from services.supervisor import WORKER_NICE, exit_code, plan, restart_delay, worker_count

ALL = ("ingress", "validator", "router", "delivery", "tracker", "alerts")


def test_the_default_plan_is_an_ingress_and_a_worker_per_core() -> None:
    children = plan(ALL, worker_count(0, 3), instance_id="host", python="py", metrics_port=9100)
    assert [c.name for c in children] == ["ingress", "worker-1", "worker-2", "worker-3"]
    ingress, *workers = children
    assert ingress.argv == ("py", "-m", "services.cli", "run", "--in-process", "--stages", "ingress,alerts")
    assert ingress.nice == 0  # the 202 never waits behind validation for a core
    assert {w.argv[-1] for w in workers} == {"validator,router,delivery,tracker"}
    assert {w.nice for w in workers} == {WORKER_NICE}
    assert [w.env["RELAIS_INSTANCE_ID"] for w in workers] == [f"host-worker-{n}" for n in range(1, 4)]
    assert [w.env["RELAIS_METRICS_PORT"] for w in workers] == ["9100", "9101", "9102"]  # one each to scrape
    assert "RELAIS_METRICS_PORT" not in ingress.env  # the ingress serves /metrics on its HTTP port


@pytest.mark.parametrize(("setting", "cores", "expected"),
                         [(0, 2, 2), (0, 4, 4), (0, None, 1), (0, 1, 1), (3, 2, 3), (1, 16, 1)])
def test_worker_count(setting: int, cores: int | None, expected: int) -> None:
    assert worker_count(setting, cores) == expected


def test_only_the_stages_asked_for_and_the_demo_target() -> None:
    children = plan(("validator", "router"), 2, instance_id="i", demo_target_port=8090, python="py")
    assert [c.name for c in children] == ["worker-1", "worker-2", "demo-target"]
    assert children[0].argv[-1] == "validator,router"
    assert children[-1].argv == ("py", "-m", "devtools.demotarget", "--port", "8090")


@pytest.mark.parametrize(("restarts", "delay"), [(1, 0.5), (2, 1.0), (3, 2.0), (6, 16.0), (7, 30.0), (50, 30.0)])
def test_restart_backoff_doubles_up_to_30_s(restarts: int, delay: float) -> None:
    assert restart_delay(restarts) == delay


def test_exit_code_names_the_child() -> None:
    assert [exit_code(i) for i in range(3)] == [10, 11, 12]
