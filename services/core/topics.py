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
AUDIT_HEAD = "audit.head"  # the audit chain's head, anchored outside the ledger database (compacted)


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


def delivery_topics(settings: Settings) -> tuple[str, ...]:
    """What the delivery stage consumes: `deliveries` and one retry topic per RELAIS_RETRY_DELAYS_S tier."""
    return (DELIVERIES, *(retry_topic(n) for n in range(1, len(settings.retry_delays_s) + 1)))


def stage_inputs(settings: Settings) -> dict[str, list[str]]:
    """Each worker stage and the logical topics its consumer group reads (where its records wait)."""
    return {"validator": [RECEIVED], "router": [VALIDATED], "delivery": list(delivery_topics(settings)),
            "tracker": [EVENTS]}


def declared_topics(settings: Settings) -> list[TopicSpec]:
    """Every topic, with retention suited to health data: long enough to recover, no longer.

    Retention applies when Relais creates a topic; change it on existing topics with Kafka's tools.
    """
    pipeline = round(settings.topic_retention_days * DAY_MS)
    kept = round(settings.dlq_retention_days * DAY_MS)
    topics = [
        TopicSpec(RECEIVED, "Bundles accepted by ingress, awaiting validation", pipeline),
        TopicSpec(VALIDATED, "Bundles that conform to TDDUI, awaiting routing", pipeline),
        TopicSpec(REJECTED, "Bundles refused by the validator, with their OperationOutcome", pipeline),
        TopicSpec(DELIVERIES, "One record per (transfer, target), awaiting delivery", pipeline),
        TopicSpec(DELIVERIES_DLQ, "Deliveries that need an operator (replay or discard)", kept),
        TopicSpec(POISON, "Records a stage could not handle at all (bugs, corrupt records)", kept),
        TopicSpec(EVENTS, "Every stage's facts about each transfer; the ledger's source", kept),
        TopicSpec(AUDIT_HEAD, "The audit trail's head (sequence + MAC), where the database cannot rewrite it",
                  kept, compacted=True),
    ]
    topics += [
        TopicSpec(retry_topic(n), f"Deliveries waiting {delay:g}s before attempt tier {n}", pipeline)
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
