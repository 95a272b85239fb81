"""Declared topics: the fixed pipeline topics, one retry tier per delay, and broker-side config; schemas/asyncapi.yaml
describes every one."""

from __future__ import annotations

import pytest

from services.core.settings import MiB, Settings
from services.core.topics import (
    AUDIT_HEAD,
    DELIVERIES,
    DELIVERIES_DLQ,
    EVENTS,
    POISON,
    RECEIVED,
    REJECTED,
    VALIDATED,
    declared_topics,
    max_record_bytes,
    retry_topic,
    topic_config,
)
from tests.support.schemas import asyncapi

FIXED = {RECEIVED, VALIDATED, REJECTED, EVENTS, POISON, DELIVERIES, DELIVERIES_DLQ, AUDIT_HEAD}


@pytest.mark.parametrize(("delays", "retry_names"), [
    ([10.0, 60.0, 600.0], ["deliveries.retry.1", "deliveries.retry.2", "deliveries.retry.3"]),
    ([5.0], ["deliveries.retry.1"]),
    ([1.0, 2.0, 4.0, 8.0, 16.0], [f"deliveries.retry.{n}" for n in range(1, 6)]),
])
def test_declared_topics_include_one_retry_tier_per_delay(delays: list[float],
                                                          retry_names: list[str]) -> None:
    names = [t.name for t in declared_topics(Settings(retry_delays_s=delays))]
    assert len(names) == len(set(names)), "a topic is declared twice"
    assert set(names) == FIXED | set(retry_names)
    assert [n for n in names if n.startswith("deliveries.retry.")] == retry_names


def test_retry_topic_purpose_names_its_delay() -> None:
    specs = {t.name: t for t in declared_topics(Settings(retry_delays_s=[10.0, 90.5]))}
    assert "10s" in specs["deliveries.retry.1"].purpose
    assert "90.5s" in specs["deliveries.retry.2"].purpose


@pytest.mark.parametrize(("tier", "name"), [(1, "deliveries.retry.1"), (12, "deliveries.retry.12")])
def test_retry_topic(tier: int, name: str) -> None:
    assert retry_topic(tier) == name


def test_every_topic_keeps_records_at_least_a_week_and_dead_letters_longer() -> None:
    week = 7 * 24 * 3600 * 1000
    specs = {t.name: t for t in declared_topics(Settings())}
    assert all(t.retention_ms >= week and t.purpose for t in specs.values())
    assert specs[DELIVERIES_DLQ].retention_ms > specs[DELIVERIES].retention_ms
    assert specs[POISON].retention_ms > specs[RECEIVED].retention_ms


@pytest.mark.parametrize("body", [1024, 10 * MiB, 30 * MiB])
def test_topic_config_takes_a_record_larger_than_the_largest_body(body: int) -> None:
    settings = Settings(max_body_bytes=body)
    for spec in declared_topics(settings):
        config = topic_config(spec, settings)
        assert int(config["max.message.bytes"]) > body
        assert int(config["max.message.bytes"]) == max_record_bytes(settings)
        assert config["retention.ms"] == str(spec.retention_ms)
        assert config["cleanup.policy"] == ("compact" if spec.compacted else "delete")
        assert all(isinstance(v, str) for v in config.values())


def test_retention_comes_from_settings() -> None:
    from services.core.settings import Settings
    from services.core.topics import DAY_MS, DELIVERIES_DLQ, EVENTS, RECEIVED, declared_topics

    specs = {s.name: s for s in declared_topics(Settings(topic_retention_days=2, dlq_retention_days=10))}
    assert specs[RECEIVED].retention_ms == 2 * DAY_MS
    assert specs["deliveries.retry.1"].retention_ms == 2 * DAY_MS
    assert specs[DELIVERIES_DLQ].retention_ms == specs[EVENTS].retention_ms == 10 * DAY_MS


def test_asyncapi_describes_every_declared_topic() -> None:
    addresses = {c["address"] for c in asyncapi()["channels"].values()}
    for spec in declared_topics(Settings()):
        name = "deliveries.retry.{tier}" if spec.name.startswith("deliveries.retry.") else spec.name
        assert name in addresses, spec.name
