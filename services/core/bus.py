"""The bus interface every stage is written against; Kafka and the embedded log implement it.

Two operations matter for correctness:

* `Bus.publish` returns only once the records are durable (Kafka: acks=all, idempotent producer).
  Ingress answers 202 after it, never before.
* `Subscription.complete` publishes a stage's outputs *and* commits its input offsets as one
  atomic step (Kafka: a transaction). A crash before it returns leaves the input uncommitted,
  so the records are handled again: at-least-once, never lost.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple, Protocol

from services.core.envelope import Emit, Record


class Partition(NamedTuple):
    """A (logical topic, partition) pair."""

    topic: str
    partition: int


class Subscription(Protocol):
    """One consumer-group member: fetch records, then complete them with their outputs."""

    # The least time between the starts of two `complete` calls. A bus whose every call costs the broker work of
    # its own (Kafka: a transaction) gathers more records per call under load; an idle stage's next record is
    # completed at once all the same (the interval counts from the previous call's start).
    commit_interval_s: float

    async def start(self) -> None:
        """Join the group; returns once the subscription can poll."""

    async def stop(self) -> None:
        """Leave the group; safe to call twice."""

    async def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        """Up to `max_records` records, in log order per partition; empty after `timeout_s`."""

    async def complete(self, emits: Sequence[Emit], offsets: Mapping[Partition, int]) -> None:
        """Atomically publish `emits` and commit `offsets` (the next offset to read, per partition)."""

    def pause_until(self, partition: Partition, offset: int, due: float) -> None:
        """Re-deliver `partition` from `offset` no earlier than the monotonic time `due`."""

    def assignment(self) -> set[Partition]:
        """Partitions currently assigned to this member."""

    async def pending(self, partitions: Sequence[Partition]) -> list[Record]:
        """The records not yet completed in `partitions` (a member taking them over learns what waits there)."""


class Bus(Protocol):
    """A durable log with topics, keys, headers and consumer groups."""

    async def start(self) -> None:
        """Connect and make sure every declared topic exists."""

    async def stop(self) -> None:
        """Flush and disconnect; safe to call twice."""

    async def publish(self, emits: Sequence[Emit]) -> None:
        """Publish and return once every record is durable; raises BusUnavailable otherwise."""

    def subscribe(self, stage: str, topics: Sequence[str]) -> Subscription:
        """A new member of the stage's consumer group, reading the given logical topics."""

    async def lag(self, stage: str, topics: Sequence[str]) -> dict[Partition, int]:
        """Records not yet committed by the stage's group, per partition."""

    async def storage_problem(self) -> str | None:
        """Why this process cannot write to the bus's storage now (readiness), or None."""
