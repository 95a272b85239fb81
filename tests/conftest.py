"""Shared fixtures: a real Kafka for the session, isolated settings per test.

Kafka comes from, in order: RELAIS_KAFKA_BOOTSTRAP (an external broker), testcontainers when a
Docker engine answers, else a local broker assembled from Maven Central jars (devtools.devkafka).
Locally, Kafka tests skip when none of these works. In CI (CI=true or RELAIS_REQUIRE_KAFKA=1) a
missing broker is an error, and a skipped Kafka test fails the run.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from services.core.settings import Settings
from tests.support import outcomes

KAFKA_REQUIRED = (os.environ.get("CI", "").lower() in ("1", "true", "yes")
                  or os.environ.get("RELAIS_REQUIRE_KAFKA") == "1")


def _docker_kafka() -> Iterator[str] | None:
    """A testcontainers Kafka when a Docker engine answers; None otherwise."""
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception:  # noqa: BLE001 - no Docker engine, no Docker SDK: use the local jars instead
        return None
    from testcontainers.kafka import KafkaContainer

    def run() -> Iterator[str]:
        with KafkaContainer("apache/kafka:3.9.1").with_kraft() as container:
            yield container.get_bootstrap_server()

    return run()


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """host:port of a real Kafka broker for the whole test session."""
    external = os.environ.get("RELAIS_KAFKA_BOOTSTRAP", "").strip()
    if external:
        yield external
        return
    docker_kafka = _docker_kafka()
    if docker_kafka is not None:
        yield from docker_kafka
        return
    from devtools.devkafka import DevKafkaError, LocalKafka

    kafka = LocalKafka()
    try:
        kafka.start()
    except DevKafkaError as exc:
        message = f"no Kafka broker for the tests: {exc}"
        if KAFKA_REQUIRED:
            pytest.fail(message + " (Kafka tests are required here: CI or RELAIS_REQUIRE_KAFKA=1)")
        pytest.skip(message)
    try:
        yield kafka.bootstrap
    finally:
        kafka.stop(grace_s=2)  # its data is deleted next: a controlled shutdown would only cost time


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Settings isolated to one test: own topic prefix, own ledger file, short retry tiers."""
    prefix = f"t{uuid.uuid4().hex[:10]}."

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "topic_prefix": prefix,
            "topic_partitions": 3,
            "database_url": f"sqlite+aiosqlite:///{tmp_path}/ledger.db",
            "retry_delays_s": [0.2, 0.5, 1.0],
            "max_attempts": 4,
            "auth_disabled": True,
            "log_format": "console",
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """In CI, a Kafka test that skipped did not prove anything: report it as failed."""
    report = yield
    expected_failure = hasattr(report, "wasxfail")  # it ran and failed as declared: not a skip
    if item.get_closest_marker("kafka") is not None and report.skipped and not expected_failure and KAFKA_REQUIRED:
        report.outcome = "failed"
        report.longrepr = f"Kafka test skipped where Kafka is required: {report.longrepr}"
    return report


# Counted where reports arrive: in this process, or in the xdist controller when `make test` runs workers.
_kafka_outcomes: dict[str, int] = {"passed": 0, "skipped": 0, "failed": 0}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "kafka" not in report.keywords:
        return
    if report.when == "call" or report.outcome != "passed":
        _kafka_outcomes[report.outcome] = _kafka_outcomes.get(report.outcome, 0) + 1


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI, a run in which Kafka tests ran but none passed fails, whatever else happened."""
    if getattr(session.config, "workerinput", None) is not None:
        return  # an xdist worker: the controller, which sees every report, decides
    ran_kafka = any(_kafka_outcomes.values())
    collected_kafka = ran_kafka or any(i.get_closest_marker("kafka") for i in session.items)
    if KAFKA_REQUIRED and collected_kafka and _kafka_outcomes["passed"] == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_configure(config: pytest.Config) -> None:
    outcomes.register(config)  # a run that reports fewer tests than it collected fails (tests/support/outcomes.py)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Any test that needs the broker is a Kafka test, whether or not its author marked it."""
    for item in items:
        if "kafka_bootstrap" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kafka)


@pytest.fixture(params=["kafka", "embedded"])
def bus_settings(request: pytest.FixtureRequest, make_settings: Callable[..., Settings],
                 tmp_path: Path) -> Callable[..., Settings]:
    """Settings for the same stage test on each bus: a real Kafka, then the embedded SQLite log."""
    if request.param == "kafka":
        bootstrap = request.getfixturevalue("kafka_bootstrap")
        request.node.add_marker(pytest.mark.kafka)
        return lambda **kw: make_settings(kafka_bootstrap=bootstrap, **kw)
    return lambda **kw: make_settings(kafka_bootstrap=None, embedded_log_path=tmp_path / "log.db", **kw)
