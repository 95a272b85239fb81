"""Pure DLQ decisions: one dead-letter model for every stage, which ones a filter selects, what a replay publishes.

A dead letter is a record some stage gave up on (`Fate.DEAD_LETTER`): a delivery that exhausted its
attempts or was refused (`deliveries.dlq`, one per transfer and target), or a record a stage could not
handle at all (the runner's poison topic `transfers.dlq`). Both are listed, shown, replayed to where
they failed and discarded the same way; their id is `TRANSFER_ID/SLOT`, where the slot is the target
for a delivery and `@stage` (or `@delivery:target`) for a stage's dead letter.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from services.core.blobstore import BlobRef
from services.core.envelope import Emit, Envelope, event
from services.core.fate import STAGE_INPUT
from services.core.topics import DELIVERIES, RETRY_PREFIX

# Envelope attributes the runner adds to a poison copy; a replay sends the record back without them.
POISON_ATTRIBUTES = frozenset({"origtopic", "origpartition", "origoffset", "failedstage", "reason"})


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead letter, as the ledger knows it (never its payload)."""

    transfer_id: str
    slot: str  # the target (delivery dead letter) or "@stage[:target]" (a stage's dead letter)
    stage: str  # the stage that gave up on the record
    target: str | None
    producer: str | None
    status: str
    attempts: int
    last_http_status: int | None
    reason: str
    outcome: dict[str, Any] | None
    first_failure: str | None
    last_failure: str | None
    dead_lettered_at: datetime
    detail: dict[str, Any]

    @property
    def id(self) -> str:
        """The operator-facing id: `transfer/slot`."""
        return f"{self.transfer_id}/{self.slot}"

    @property
    def is_delivery(self) -> bool:
        """True for a delivery's dead letter (deliveries.dlq), False for a stage's (poison topic)."""
        return not self.slot.startswith("@")

    def original(self) -> dict[str, Any]:
        """Where the record was when its stage gave up: topic, partition, offset."""
        d = self.detail
        if self.is_delivery:
            return {"topic": d.get("orig_topic"), "partition": d.get("orig_partition"), "offset": d.get("orig_offset")}
        return {"topic": d.get("topic"), "partition": d.get("partition"), "offset": d.get("offset")}

    def replay_topic(self) -> str:
        """Where a replay sends the record: the input topic of the stage that gave up on it."""
        topic = str(self.original().get("topic") or "")
        if self.is_delivery or topic.startswith(RETRY_PREFIX):
            return DELIVERIES
        return topic or STAGE_INPUT.get(self.stage, DELIVERIES)

    def summary(self) -> dict[str, Any]:
        """Metadata for listings and `show` (no payload, no personal data)."""
        d = self.detail
        return {
            "id": self.id, "transfer_id": self.transfer_id, "slot": self.slot, "stage": self.stage,
            "kind": "delivery" if self.is_delivery else "stage", "target": self.target, "producer": self.producer,
            "status": self.status, "attempts": d.get("attempts", self.attempts), "reason": self.reason,
            "last_http_status": self.last_http_status, "outcome": self.outcome,
            "first_failure": self.first_failure, "last_failure": self.last_failure,
            "dead_lettered_at": self.dead_lettered_at.isoformat(), "original": self.original(),
            "replay_to": self.replay_topic(),
            "payload": {k: v for k, v in (d.get("blob") or {}).items() if k in ("sha256", "size")}
            if self.is_delivery else {"poison_id": d.get("poison_id")},
        }


@dataclass(frozen=True, slots=True)
class DlqFilter:
    """Which dead letters an operator means; None does not constrain."""

    target: str | None = None
    producer: str | None = None
    reason: str | None = None  # substring, case-insensitive
    since: datetime | None = None
    until: datetime | None = None
    stage: str | None = None
    transfer_id: str | None = None

    def matches(self, dl: DeadLetter) -> bool:
        """True when `dl` satisfies every given condition."""
        if self.transfer_id is not None and dl.transfer_id != self.transfer_id:
            return False
        if self.target is not None and dl.target != self.target:
            return False
        if self.stage is not None and dl.stage != self.stage:
            return False
        if self.producer is not None and dl.producer != self.producer:
            return False
        if self.reason is not None and self.reason.lower() not in dl.reason.lower():
            return False
        if self.since is not None and dl.dead_lettered_at < self.since:
            return False
        return self.until is None or dl.dead_lettered_at <= self.until


def blob_of(dl: DeadLetter) -> BlobRef | None:
    """Where a delivery dead letter's payload is."""
    blob = dl.detail.get("blob")
    if not isinstance(blob, dict) or "uri" not in blob:
        return None
    return BlobRef(str(blob["uri"]), str(blob.get("sha256", "")), int(blob.get("size", 0)))


def replay_emits(dl: DeadLetter, ref: BlobRef, operator: str, note: str | None = None) -> list[Emit]:
    """A fresh delivery record (attempts from zero, payload by claim check) and the `replayed` event."""
    extra = {str(k): str(v) for k, v in (dl.detail.get("extra") or {}).items()}
    replays = int(extra.get("replays", "0") or 0) + 1
    extra |= {**ref.to_extra(), "replays": str(replays)}
    env = Envelope(type="fr.relais.delivery.requested", source="/relais/dlq", transfer_id=dl.transfer_id,
                   data=b"", producer=dl.producer, target=dl.target, attempt=0, extra=extra)
    key = str(dl.detail.get("key") or f"{dl.target}|{dl.transfer_id}").encode()
    return [Emit(DELIVERIES, key, env),
            event(env, "replayed", "dlq", {"operator": operator, "note": note, "replay": replays})]


def stage_replay_emits(dl: DeadLetter, poisoned: Envelope, key: bytes | None, operator: str,
                       note: str | None = None) -> list[Emit]:
    """The record as it was before its stage gave up (read back from the poison topic), and the event."""
    extra = {k: v for k, v in poisoned.extra.items() if k not in POISON_ATTRIBUTES}
    replays = int(extra.get("replays", "0") or 0) + 1
    extra["replays"] = str(replays)
    env = poisoned.evolve(extra=extra, not_before=None, attempt=0 if dl.stage == "delivery" else poisoned.attempt)
    return [Emit(dl.replay_topic(), key, env),
            event(env, "replayed", "dlq", {"operator": operator, "note": note, "replay": replays, "slot": dl.slot,
                                           "failed_stage": dl.stage})]


def discard_emit(dl: DeadLetter, operator: str, reason: str) -> Emit:
    """The `discarded` event that closes a dead letter for good."""
    env = Envelope(type="fr.relais.delivery.discarded", source="/relais/dlq", transfer_id=dl.transfer_id,
                   data=b"", producer=dl.producer, target=dl.target)
    detail: dict[str, Any] = {"operator": operator, "reason": reason, "outcome": dl.outcome}
    if not dl.is_delivery:
        detail |= {"slot": dl.slot, "failed_stage": dl.stage}
    return event(env, "discarded", "dlq", detail)
