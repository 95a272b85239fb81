"""The Kafka bus: the only module that imports aiokafka."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code

from services.core.bus import Partition
from services.core.crypto import Keyring, open_envelope, seal_envelope
from services.core.envelope import Emit, Envelope, EnvelopeError, Record
from services.core.errors import BusUnavailable, ConfigurationError
from services.core.logging import get_logger
from services.core.settings import Settings
from services.core.tasks import cancel_and_wait
from services.core.topics import declared_topics, max_record_bytes, topic_config

log = get_logger(__name__)

TRANSACTION_TIMEOUT_MS = 15_000
# Joining the group includes waiting for the rebalance to finish. Two replicas started together sometimes never
# get there (seen: one member rejoined every heartbeat, 78 generations in a minute, while the other's JoinGroup
# never returned): past this, the member leaves and joins again as a new one, which ends the cycle.
JOIN_TIMEOUT_S = 30.0
PENDING_TIMEOUT_S = 60.0  # reading the records waiting in partitions taken over (their retry backlog)


class KafkaBus:
    """Relais's bus on Apache Kafka: idempotent publishing, transactional stage completion."""

    def __init__(self, settings: Settings) -> None:
        if not settings.kafka_bootstrap:
            raise ConfigurationError("KafkaBus needs RELAIS_KAFKA_BOOTSTRAP (host:port of a Kafka broker)")
        self.settings = settings
        self.bootstrap = settings.kafka_bootstrap
        self._producer: AIOKafkaProducer | None = None
        self._instance = settings.instance_id or uuid.uuid4().hex[:12]
        self.keyring = Keyring.from_settings(settings)  # None: record values are written in clear

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Create missing topics, then start the idempotent producer used by `publish`."""
        await self.ensure_topics()
        if self._producer is None:
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap,
                acks="all",
                enable_idempotence=True,
                max_request_size=max_record_bytes(self.settings),
                request_timeout_ms=int(self.settings.kafka_timeout_s * 1000),
                linger_ms=2,  # lets concurrent requests share a produce request at no visible cost
            )
            await producer.start()
            self._producer = producer

    async def stop(self) -> None:
        """Flush and close the producer; safe twice."""
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    async def ensure_topics(self) -> None:
        """Create every declared topic that does not exist yet (idempotent, safe to race)."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            specs = [s for s in declared_topics(self.settings) if self.settings.topic(s.name) not in existing]
            if not specs:
                return
            response = await admin.create_topics([
                NewTopic(
                    name=self.settings.topic(s.name),
                    num_partitions=self.settings.topic_partitions,
                    replication_factor=self.settings.topic_replication,
                    topic_configs=topic_config(s, self.settings),
                )
                for s in specs
            ])
            for topic, code, *message in response.topic_errors:
                error_type = for_code(code)
                if code and error_type is not TopicAlreadyExistsError:
                    raise ConfigurationError(f"cannot create topic {topic}: {error_type.__name__} {message}")
            log.info("topics created", topics=[s.name for s in specs])
        finally:
            await admin.close()

    # --- producing -------------------------------------------------------------------------
    async def publish(self, emits: Sequence[Emit]) -> None:
        """Publish every emit and wait for the broker's acks=all acknowledgement of each."""
        if self._producer is None:
            raise BusUnavailable("the Kafka producer is not started")
        try:
            async with asyncio.timeout(self.settings.kafka_timeout_s):
                futures = [await self._send(self._producer, e) for e in emits]
                await asyncio.gather(*futures)
        except (KafkaError, TimeoutError) as exc:
            raise BusUnavailable(f"Kafka did not acknowledge: {type(exc).__name__} {exc}") from exc

    async def _send(self, producer: AIOKafkaProducer, emit: Emit) -> asyncio.Future[object]:
        value, headers = seal_envelope(self.keyring, emit.envelope)
        return await producer.send(  # type: ignore[no-any-return]
            self.settings.topic(emit.topic), value=value, key=emit.key, headers=headers,
        )

    # --- consuming -------------------------------------------------------------------------
    def subscribe(self, stage: str, topics: Sequence[str]) -> KafkaSubscription:
        """A transactional consumer-group member for one stage replica."""
        return KafkaSubscription(self, stage, topics, f"{self.settings.group(stage)}-{self._instance}")

    async def storage_problem(self) -> str | None:
        """Kafka's storage is the brokers': what is wrong there shows as unacknowledged publishes (503)."""
        return None

    async def _partitions(self, topics: Sequence[str]) -> list[TopicPartition]:
        """Every partition of the logical `topics` that exist. A fresh consumer knows no topic metadata until
        it subscribes, and these readers never subscribe (they must not join the group): ask the cluster."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            described = await admin.describe_topics([self.settings.topic(t) for t in topics])
        finally:
            await admin.close()
        return [TopicPartition(d["topic"], p["partition"]) for d in described if not d.get("error_code")
                for p in d["partitions"]]

    async def lag(self, stage: str, topics: Sequence[str]) -> dict[Partition, int]:
        """End offset minus committed offset, per partition, for the stage's group."""
        group = self.settings.group(stage)
        tps = await self._partitions(topics)
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=group, enable_auto_commit=False,
                                    isolation_level="read_committed")
        await consumer.start()
        try:
            ends = await consumer.end_offsets(tps) if tps else {}
            result = {}
            for tp in tps:
                committed = await consumer.committed(tp) or 0
                result[Partition(self._logical(tp.topic), tp.partition)] = max(0, ends[tp] - committed)
            return result
        finally:
            await consumer.stop()

    async def pending_header_values(self, stage: str, topics: Sequence[str], header: str,
                                    timeout_s: float = 60.0, unless: str | None = None) -> dict[str, int]:
        """How many records the stage's group has not consumed yet carry each value of `header` (records past
        the committed offsets are read, never committed: the group is not joined; a group that never
        committed reads from the start). Records carrying the header `unless` are not counted. `relais keys`
        uses it to tell whether records sealed with an old key still wait."""
        counts: dict[str, int] = {}
        async for m in self.uncommitted(self.settings.group(stage), await self._partitions(topics), timeout_s,
                                        f"{stage}'s pending records"):
            headers = dict(m.headers)
            if unless is None or unless not in headers:
                value = headers.get(header)
                if value is not None:
                    counts[value.decode()] = counts.get(value.decode(), 0) + 1
        return counts

    async def uncommitted(self, group: str, tps: Sequence[TopicPartition], timeout_s: float,
                          what: str) -> AsyncIterator[ConsumerRecord[bytes, bytes]]:
        """The records of `tps` past `group`'s committed offsets, up to their end now; read without joining the
        group and without committing. Raises BusUnavailable when Kafka fails or it takes over `timeout_s`."""
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=group, enable_auto_commit=False,
                                    isolation_level="read_committed",
                                    max_partition_fetch_bytes=max_record_bytes(self.settings))
        try:
            await consumer.start()
            if not tps:
                return
            consumer.assign(list(tps))
            ends = await consumer.end_offsets(list(tps))
            starts = await consumer.beginning_offsets(list(tps))
            active = set()
            for tp in tps:
                start = max(await consumer.committed(tp) or 0, starts[tp])
                if start < ends[tp]:
                    consumer.seek(tp, start)
                    active.add(tp)
            deadline = time.monotonic() + timeout_s
            while active and time.monotonic() < deadline:
                batches = await consumer.getmany(*active, timeout_ms=500, max_records=500)
                for tp, messages in batches.items():
                    for m in messages:
                        if m.offset < ends[tp]:
                            yield m
                for tp in list(active):
                    if await consumer.position(tp) >= ends[tp]:
                        active.discard(tp)
            if active:
                raise BusUnavailable(f"reading {what} took longer than {timeout_s:g}s")
        except KafkaError as exc:
            raise BusUnavailable(f"Kafka read failed: {exc}") from exc
        finally:
            await consumer.stop()

    def _logical(self, physical: str) -> str:
        prefix = self.settings.topic_prefix
        return physical[len(prefix):] if prefix and physical.startswith(prefix) else physical


class KafkaSubscription:
    """A consumer plus a transactional producer: consume, transform, produce, commit atomically."""

    def __init__(self, bus: KafkaBus, stage: str, topics: Sequence[str], transactional_id: str) -> None:
        self.bus = bus
        self.group = bus.settings.group(stage)
        self.topics = [bus.settings.topic(t) for t in topics]
        self.transactional_id = transactional_id
        self._consumer: AIOKafkaConsumer | None = None
        self._joined = False  # the consumer's start() returned: it is a member of the group
        self._producer: AIOKafkaProducer | None = None
        self._paused: dict[TopicPartition, tuple[int, float]] = {}
        self.commit_interval_s = bus.settings.kafka_commit_interval_ms / 1000
        # Set by the runner: awaited when a rebalance takes partitions away, before this member rejoins, so
        # their records in hand finish and commit here first (a hand-over at a record boundary).
        self.on_revoke: Callable[[set[Partition]], Awaitable[None]] | None = None

    async def start(self) -> None:
        """Start the transactional producer, then join the group."""
        settings = self.bus.settings
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bus.bootstrap, transactional_id=self.transactional_id,
            enable_idempotence=True, acks="all", max_request_size=max_record_bytes(settings),
            # A replica killed mid-transaction blocks read_committed readers of its partitions until
            # the transaction times out (or the same instance id restarts and fences it): keep it short.
            transaction_timeout_ms=TRANSACTION_TIMEOUT_MS,
        )
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bus.bootstrap, group_id=self.group,
            enable_auto_commit=False, auto_offset_reset="earliest", isolation_level="read_committed",
            max_partition_fetch_bytes=max_record_bytes(settings),
            fetch_max_bytes=max(52428800, max_record_bytes(settings)),
            # Co-partitioned: with equal partition counts (Relais creates every topic with the same), the range
            # assignor gives one member partition p of every topic it reads, so all the records of one key
            # (delivery: a lane and its retry tiers) are in one process. Round-robin stays listed so a group
            # still forms while older members (round-robin only) are being replaced.
            partition_assignment_strategy=(RangePartitionAssignor, RoundRobinPartitionAssignor),
        )
        self._consumer.subscribe(topics=self.topics, listener=_Revocations(self))
        try:
            async with asyncio.timeout(JOIN_TIMEOUT_S):
                await self._consumer.start()  # returns once this member has its first assignment
            self._joined = True
        except TimeoutError:
            raise BusUnavailable(f"joining the consumer group {self.group} took over {JOIN_TIMEOUT_S:g}s (a rebalance "
                                 "that does not finish); leaving it to join again") from None

    async def stop(self) -> None:
        """Leave the group and close the producer; safe twice."""
        consumer, self._consumer = self._consumer, None
        producer, self._producer = self._producer, None
        if consumer is not None:
            if not self._joined:
                await _abandon_join(consumer)
            self._joined = False
            await consumer.stop()
        if producer is not None:
            await producer.stop()

    async def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        """Fetch records, after resuming partitions whose pause is over."""
        assert self._consumer is not None, "start() the subscription first"
        self._resume_due()
        try:
            batches = await self._consumer.getmany(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        except KafkaError as exc:
            raise BusUnavailable(f"Kafka fetch failed: {exc}") from exc
        return [self._record(m) for msgs in batches.values() for m in msgs]

    def _record(self, m: ConsumerRecord[bytes, bytes]) -> Record:
        topic = self.bus._logical(m.topic)
        try:
            envelope = open_envelope(self.bus.keyring, Envelope.from_headers(m.headers, m.value))
        except EnvelopeError as exc:
            # A foreign or corrupt record still has to reach the stage so it can be dead-lettered.
            envelope = Envelope(type="fr.relais.invalid", source="/relais/unknown", transfer_id="unknown",
                                data=m.value or b"", extra={"envelopeerror": str(exc)})
        return Record(topic, m.partition, m.offset, m.key, envelope)

    async def complete(self, emits: Sequence[Emit], offsets: Mapping[Partition, int]) -> None:
        """One Kafka transaction: every emit plus the group's new offsets, or nothing."""
        assert self._producer is not None, "start() the subscription first"
        tp_offsets = {TopicPartition(self.bus.settings.topic(p.topic), p.partition): o for p, o in offsets.items()}
        try:
            async with self._producer.transaction():
                for emit in emits:
                    await self.bus._send(self._producer, emit)
                if tp_offsets:
                    await self._producer.send_offsets_to_transaction(tp_offsets, self.group)
        except KafkaError as exc:
            raise BusUnavailable(f"Kafka transaction failed: {type(exc).__name__} {exc}") from exc

    async def pending(self, partitions: Sequence[Partition]) -> list[Record]:
        """The records of `partitions` past the group's committed offsets; read only (nothing handed out)."""
        tps = [TopicPartition(self.bus.settings.topic(p.topic), p.partition) for p in partitions]
        return [self._record(m) async for m in self.bus.uncommitted(self.group, tps, PENDING_TIMEOUT_S,
                                                                    f"{self.group}'s pending records")]

    def pause_until(self, partition: Partition, offset: int, due: float) -> None:
        """Seek back to `offset` and pause the partition until the monotonic time `due`."""
        assert self._consumer is not None
        tp = TopicPartition(self.bus.settings.topic(partition.topic), partition.partition)
        if tp not in self._consumer.assignment():
            return  # revoked meanwhile: the new owner reads from the committed offset
        self._consumer.seek(tp, offset)
        self._consumer.pause(tp)
        self._paused[tp] = (offset, due)

    def _resume_due(self) -> None:
        assert self._consumer is not None
        now = time.monotonic()
        assigned = self._consumer.assignment()
        for tp, (_, due) in list(self._paused.items()):
            if tp not in assigned:
                del self._paused[tp]
            elif due <= now:
                self._consumer.resume(tp)
                del self._paused[tp]

    def assignment(self) -> set[Partition]:
        """Partitions currently assigned to this member."""
        if self._consumer is None:
            return set()
        return {Partition(self.bus._logical(tp.topic), tp.partition) for tp in self._consumer.assignment()}


class _Revocations(ConsumerRebalanceListener):  # type: ignore[misc]
    """A rebalance waits for the records in hand of the partitions it takes away (within its timeout)."""

    def __init__(self, sub: KafkaSubscription) -> None:
        self.sub = sub

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if self.sub.on_revoke is not None and revoked:
            await self.sub.on_revoke({Partition(self.sub.bus._logical(tp.topic), tp.partition) for tp in revoked})

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        """Nothing to do: the runner learns its new partitions from `assignment()` after its next poll."""


async def _abandon_join(consumer: AIOKafkaConsumer) -> None:
    """End a join that never finished, so `consumer.stop()` does not wait for it.

    aiokafka's close lets the coordination task finish its pending work first, and a JoinGroup stuck in a
    rebalance that does not end is only given up at the request timeout (40 s): every restart of a replica
    caught in such a group waited that long. Cancelling the task is safe here: the member never joined,
    so it has nothing to commit or hand back. (Reaches into aiokafka's coordinator: no public way exists.)
    """
    coordinator = getattr(consumer, "_coordinator", None)
    task = getattr(coordinator, "_coordination_task", None)
    if isinstance(task, asyncio.Task) and not task.done():
        await cancel_and_wait(task)
