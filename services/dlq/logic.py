"""Pure DLQ decisions: which dead letters a filter selects, and what a replay publishes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from services.core.blobstore import BlobRef
from services.core.envelope import Emit, Envelope, event
from services.core.topics import DELIVERIES


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead-lettered delivery, as the ledger knows it (never its payload)."""

    transfer_id: str
    target: str
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
        """The operator-facing id: `transfer/target`."""
        return f"{self.transfer_id}/{self.target}"

    def summary(self) -> dict[str, Any]:
        """Metadata for listings and `show` (no payload, no personal data)."""
        d = self.detail
        return {
            "id": self.id, "transfer_id": self.transfer_id, "target": self.target, "producer": self.producer,
            "status": self.status, "attempts": d.get("attempts", self.attempts), "reason": self.reason,
            "last_http_status": self.last_http_status, "outcome": self.outcome,
            "first_failure": self.first_failure, "last_failure": self.last_failure,
            "dead_lettered_at": self.dead_lettered_at.isoformat(),
            "original": {"topic": d.get("orig_topic"), "partition": d.get("orig_partition"),
                         "offset": d.get("orig_offset")},
            "payload": {k: v for k, v in (d.get("blob") or {}).items() if k in ("sha256", "size")},
        }


@dataclass(frozen=True, slots=True)
class DlqFilter:
    """Which dead letters an operator means; None does not constrain."""

    target: str | None = None
    producer: str | None = None
    reason: str | None = None  # substring, case-insensitive
    since: datetime | None = None
    until: datetime | None = None

    def matches(self, dl: DeadLetter) -> bool:
        """True when `dl` satisfies every given condition."""
        if self.target is not None and dl.target != self.target:
            return False
        if self.producer is not None and dl.producer != self.producer:
            return False
        if self.reason is not None and self.reason.lower() not in dl.reason.lower():
            return False
        if self.since is not None and dl.dead_lettered_at < self.since:
            return False
        return self.until is None or dl.dead_lettered_at <= self.until


def blob_of(dl: DeadLetter) -> BlobRef | None:
    """Where the dead letter's payload is."""
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


def discard_emit(dl: DeadLetter, operator: str, reason: str) -> Emit:
    """The `discarded` event that closes a dead letter for good."""
    env = Envelope(type="fr.relais.delivery.discarded", source="/relais/dlq", transfer_id=dl.transfer_id,
                   data=b"", producer=dl.producer, target=dl.target)
    return event(env, "discarded", "dlq", {"operator": operator, "reason": reason,
                                           "outcome": dl.outcome})
