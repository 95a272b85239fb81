"""The record envelope: CloudEvents 1.0, Kafka protocol binding, binary content mode.

The Bundle (or an event's JSON) is the record value, untouched; every attribute travels as a
header. CloudEvents attributes are `ce_<name>`; Relais's own attributes are CloudEvents extension
attributes (lower-case alphanumerics), so any CloudEvents-aware tool can read them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import orjson

from services.core.topics import EVENTS

FHIR_JSON = "application/fhir+json"
JSON = "application/json"
SPEC_VERSION = "1.0"

# Header keys, in one place. `content-type` is the binding's plain header, not `ce_datacontenttype`.
H_SPECVERSION = "ce_specversion"
H_ID = "ce_id"
H_TYPE = "ce_type"
H_SOURCE = "ce_source"
H_TIME = "ce_time"
H_CONTENT_TYPE = "content-type"
H_TRANSFER_ID = "ce_transferid"
H_PRODUCER = "ce_producer"
H_TARGET = "ce_target"
H_ATTEMPT = "ce_attempt"
H_NOT_BEFORE = "ce_notbefore"
EXTRA_PREFIX = "ce_"

_KNOWN = {H_SPECVERSION, H_ID, H_TYPE, H_SOURCE, H_TIME, H_CONTENT_TYPE, H_TRANSFER_ID, H_PRODUCER,
          H_TARGET, H_ATTEMPT, H_NOT_BEFORE}


class EnvelopeError(ValueError):
    """A record whose headers are not a Relais envelope (missing or malformed attribute)."""


def _now() -> datetime:
    return datetime.now(UTC)


def _timestamp(text: str) -> datetime:
    """An RFC 3339 timestamp; one without an offset is refused (comparing it would crash a stage)."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"timestamp {text!r} has no UTC offset; RFC 3339 requires one")
    return moment


def new_id() -> str:
    """A fresh, unique id for a transfer or an event."""
    return str(uuid.uuid4())


@dataclass(frozen=True, slots=True)
class Envelope:
    """One record's meaning: a CloudEvent whose data is the record value."""

    type: str
    source: str
    transfer_id: str
    data: bytes
    producer: str | None = None
    target: str | None = None
    attempt: int = 0
    not_before: datetime | None = None
    id: str = field(default_factory=new_id)
    time: datetime = field(default_factory=_now)
    content_type: str = FHIR_JSON
    extra: Mapping[str, str] = field(default_factory=dict)

    def to_headers(self) -> list[tuple[str, bytes]]:
        """Kafka headers for this envelope (binary content mode)."""
        pairs: list[tuple[str, str]] = [
            (H_SPECVERSION, SPEC_VERSION),
            (H_ID, self.id),
            (H_TYPE, self.type),
            (H_SOURCE, self.source),
            (H_TIME, self.time.isoformat()),
            (H_CONTENT_TYPE, self.content_type),
            (H_TRANSFER_ID, self.transfer_id),
            (H_ATTEMPT, str(self.attempt)),
        ]
        if self.producer is not None:
            pairs.append((H_PRODUCER, self.producer))
        if self.target is not None:
            pairs.append((H_TARGET, self.target))
        if self.not_before is not None:
            pairs.append((H_NOT_BEFORE, self.not_before.isoformat()))
        pairs += [(EXTRA_PREFIX + k, v) for k, v in sorted(self.extra.items())]
        return [(k, v.encode()) for k, v in pairs]

    @classmethod
    def from_headers(cls, headers: Iterable[tuple[str, bytes]], value: bytes | None) -> Envelope:
        """Rebuild an envelope from a record's headers and value; raises EnvelopeError when malformed."""
        h: dict[str, str] = {}
        for key, raw in headers:
            try:
                h[key] = raw.decode()
            except (UnicodeDecodeError, AttributeError) as exc:
                raise EnvelopeError(f"header {key!r} is not UTF-8 text") from exc
        missing = [k for k in (H_ID, H_TYPE, H_SOURCE, H_TRANSFER_ID) if not h.get(k)]
        if missing:
            raise EnvelopeError(f"record lacks CloudEvents header(s) {', '.join(missing)}")
        if h.get(H_SPECVERSION, SPEC_VERSION) != SPEC_VERSION:
            raise EnvelopeError(f"unsupported CloudEvents specversion {h[H_SPECVERSION]!r}; expected 1.0")
        try:
            attempt = int(h.get(H_ATTEMPT, "0"))
            time = _timestamp(h[H_TIME]) if H_TIME in h else _now()
            not_before = _timestamp(h[H_NOT_BEFORE]) if H_NOT_BEFORE in h else None
        except ValueError as exc:
            raise EnvelopeError(f"malformed envelope attribute: {exc}") from exc
        extra = {k[len(EXTRA_PREFIX):]: v for k, v in h.items() if k not in _KNOWN and k.startswith(EXTRA_PREFIX)}
        return cls(
            type=h[H_TYPE], source=h[H_SOURCE], transfer_id=h[H_TRANSFER_ID], data=value or b"",
            producer=h.get(H_PRODUCER), target=h.get(H_TARGET), attempt=attempt, not_before=not_before,
            id=h[H_ID], time=time, content_type=h.get(H_CONTENT_TYPE, FHIR_JSON), extra=extra,
        )

    def evolve(self, **changes: Any) -> Envelope:
        """A copy for the next stage: a new event id and time unless given, other fields kept."""
        changes.setdefault("id", new_id())
        changes.setdefault("time", _now())
        return replace(self, **changes)


@dataclass(frozen=True, slots=True)
class Record:
    """A record as a stage consumes it: the envelope and where it sits in the log."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    envelope: Envelope


@dataclass(frozen=True, slots=True)
class Emit:
    """A record a stage wants published: logical topic (unprefixed), key and envelope."""

    topic: str
    key: bytes | None
    envelope: Envelope


def event(source: Envelope, kind: str, stage: str, detail: Mapping[str, Any] | None = None,
          *, target: str | None = None, event_id: str | None = None) -> Emit:
    """A `transfers.events` record saying what `stage` did with `source`; keyed by transfer id.

    `event_id` names an outcome that can happen only once, so that two copies of a record reporting it (a
    record read twice) make one event in the ledger, which keeps events by id; by default every event is new.
    """
    body = {**(detail or {}), "kind": kind, "stage": stage}
    env = Envelope(
        id=event_id or new_id(),
        type=f"fr.relais.event.{kind}",
        source=f"/relais/{stage}",
        transfer_id=source.transfer_id,
        data=orjson.dumps(body),
        producer=source.producer,
        target=target if target is not None else source.target,
        attempt=source.attempt,
        content_type=JSON,
    )
    return Emit(EVENTS, source.transfer_id.encode(), env)


def split_csv(value: str | None) -> list[str]:
    """Items of a comma-separated attribute, stripped, empties dropped, order kept, duplicates removed."""
    seen: dict[str, None] = {}
    for part in (value or "").split(","):
        if part.strip():
            seen.setdefault(part.strip(), None)
    return list(seen)


def join_csv(items: Sequence[str]) -> str:
    """The inverse of split_csv."""
    return ",".join(items)
