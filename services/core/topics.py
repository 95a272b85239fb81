"""Every topic Relais uses, declared once: name, purpose, retention. Created at start-up when missing."""

from __future__ import annotations

from dataclasses import dataclass

from services.core.settings import Settings

DAY_MS = 24 * 3600 * 1000

RECEIVED = "transfers.received"
VALIDATED = "transfers.validated"
REJECTED = "transfers.rejected"
EVENTS = "transfers.events"
POISON = "transfers.dlq"
DELIVERIES = "deliveries"
DELIVERIES_DLQ = "deliveries.dlq"
RETRY_PREFIX = "deliveries.retry."


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """One logical topic: its name before prefixing, why it exists and how long it keeps records."""

    name: str
    purpose: str
    retention_ms: int
    compacted: bool = False


def retry_topic(tier: int) -> str:
    """The retry topic of a tier, counted from 1."""
    return f"{RETRY_PREFIX}{tier}"


def declared_topics(settings: Settings) -> list[TopicSpec]:
    """Every topic, with retention suited to health data: long enough to recover, no longer."""
    topics = [
        TopicSpec(RECEIVED, "Bundles accepted by ingress, awaiting validation", 7 * DAY_MS),
        TopicSpec(VALIDATED, "Bundles that conform to TDDUI, awaiting routing", 7 * DAY_MS),
        TopicSpec(REJECTED, "Bundles refused by the validator, with their OperationOutcome", 7 * DAY_MS),
        TopicSpec(DELIVERIES, "One record per (transfer, target), awaiting delivery", 7 * DAY_MS),
        TopicSpec(DELIVERIES_DLQ, "Deliveries that need an operator (replay or discard)", 30 * DAY_MS),
        TopicSpec(POISON, "Records a stage could not handle at all (bugs, corrupt records)", 30 * DAY_MS),
        TopicSpec(EVENTS, "Every stage's facts about each transfer; the ledger's source", 30 * DAY_MS),
    ]
    topics += [
        TopicSpec(retry_topic(n), f"Deliveries waiting {delay:g}s before attempt tier {n}", 7 * DAY_MS)
        for n, delay in enumerate(settings.retry_delays_s, start=1)
    ]
    return topics


def topic_config(spec: TopicSpec, settings: Settings) -> dict[str, str]:
    """Broker-side configuration of a topic: retention and the largest record it takes."""
    return {
        "retention.ms": str(spec.retention_ms),
        "cleanup.policy": "compact" if spec.compacted else "delete",
        # Ingress refuses bodies above max_body_bytes; headers and the envelope need a little more.
        "max.message.bytes": str(max_record_bytes(settings)),
    }


def max_record_bytes(settings: Settings) -> int:
    """The largest record a topic and the producer accept: the body limit plus room for headers."""
    return settings.max_body_bytes + 256 * 1024
