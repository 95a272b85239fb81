"""Quick targets first (issue 15): a burst for slow targets does not delay a quick one; no target waits for itself.

Each attempt costs the delivery process CPU (payload, repair, journal claim, the POST) whatever the target's
pace; on one event loop, a burst of first attempts for slow targets published just before a quick target's
records would run first. Once a target is known to be slow (its answers take seconds where the others' take
milliseconds), the quick target's records go first instead; the slow targets' records are all delivered all
the same, once each. And a target whose own answers slow down never gives way to its own
records (the reverted attempt did: a lone target's burst p50 went from 1 s to 7 s). Real embedded bus, real
demo targets; arrivals timed and counted at the targets, by content. (Right after start, before any answer,
a target is known slow by its requests' waits: tests/unit/delivery/test_turns.py. An end-to-end test of it
failed whenever another test ran beside it: a record gives way at most 1 s per step, so a loaded machine
lets the slow bursts through.)
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from services.core.envelope import Emit, Envelope
from services.core.settings import Settings
from services.core.targets import TargetDirectory
from services.core.topics import DELIVERIES
from tests.fixtures.tddui import make_bundle, patient_identifier
from tests.support.delivering import delivering
from tests.support.kafka import wait_for
from tests.support.processes import DemoTarget

SLOW_TARGETS, SLOW_SLOTS, FAST_BUNDLES, ROUNDS = 4, 32, 12, 3
ENTRIES = 25  # per Bundle: enough repair and claim work per first attempt to show on the event loop


@pytest.fixture
def targets(tmp_path: Path) -> Iterator[list[DemoTarget]]:
    started = [DemoTarget(tmp_path / f"t{i}.log").start() for i in range(1 + SLOW_TARGETS)]
    yield started
    for t in started:
        t.stop()


def _delivery(target: str, person: str, seed: int, entries: int = ENTRIES) -> Emit:
    env = Envelope(type="fr.relais.delivery.requested", source="/relais/tests", transfer_id=str(uuid.uuid4()),
                   data=orjson.dumps(make_bundle(entries, seed=seed)), producer="p", target=target)
    return Emit(DELIVERIES, f"{target}|{person}".encode(), env)


async def _applied(target: DemoTarget) -> list[dict[str, object]]:
    return [r for r in await asyncio.to_thread(target.received) if r["applied"]]


async def _count_at_least(target: DemoTarget, n: int) -> bool:
    return len(await _applied(target)) >= n


def _arrival(received: dict[str, object]) -> float:
    return datetime.fromisoformat(str(received["time"])).timestamp()


def _transfer(received: dict[str, object]) -> str:
    return str(received["request_id"]).split("/")[0]


async def _burst(bus: Any, fast: DemoTarget, emits: list[Emit], already: int) -> tuple[float, float]:
    """Publish `emits`: the median time from their being on the bus to the fast target receiving each of its
    Bundles, and when (epoch s) it received the last of them."""
    fast_ids = {e.envelope.transfer_id for e in emits if e.envelope.target == "fast"}
    await bus.publish(emits)
    published = time.time()  # on the bus: what follows is the delivery stage's doing
    await wait_for(lambda: _count_at_least(fast, already + len(fast_ids)), timeout_s=30)
    arrivals = [_arrival(r) for r in await _applied(fast) if _transfer(r) in fast_ids]
    return statistics.median(arrivals) - published, max(arrivals)


async def test_a_burst_for_slow_targets_published_first_does_not_delay_a_quick_targets_deliveries(
        make_settings: Callable[..., Settings], targets: list[DemoTarget], tmp_path: Path) -> None:
    fast, *slow = targets
    for t in slow:
        t.fault(delay_s=3, count=-1)  # up and answering, in 3 s
    settings = make_settings(kafka_bootstrap=None, embedded_log_path=tmp_path / "log.db", topic_partitions=6,
                             batch_size=200, log_level="warning")
    directory = TargetDirectory.model_validate({"targets": [
        {"id": "fast", "base_url": fast.fhir},
        *({"id": f"slow{i}", "base_url": t.fhir, "max_concurrency": SLOW_SLOTS, "timeouts": {"total_s": 20}}
          for i, t in enumerate(slow))]})
    rounds: list[tuple[float, float, int]] = []  # per round: the fast target's median alone, beside, slow ahead
    async with delivering(settings, directory, tmp_path) as (bus, stage):
        # Every target's pace is known (a target not heard from yet is not slow), connections are open.
        await bus.publish([_delivery("fast", "warm-up", seed=1)]
                          + [_delivery(f"slow{i}", "warm-up", seed=10 + i) for i in range(SLOW_TARGETS)])

        async def answered() -> bool:
            return all(rt.latency.summary().calls for rt in stage.runtimes.values())

        async def idle() -> bool:
            return not any(rt.gate.busy or rt.gate.waiting for rt in stage.runtimes.values())

        await wait_for(answered, timeout_s=30)
        for nth in range(ROUNDS):
            fast_so_far, slow_so_far = 1 + 2 * FAST_BUNDLES * nth, 1 + SLOW_SLOTS * nth
            alone, _ = await _burst(bus, fast, [_delivery("fast", f"a{nth}-{n}", seed=100 + 1000 * nth + n)
                                                for n in range(FAST_BUNDLES)], fast_so_far)
            # Every slow target's slots filled with first attempts, published just before the fast target's.
            emits = [_delivery(f"slow{i}", f"s{nth}-{n}", seed=10_000 * (i + 1) + 100 * nth + n)
                     for n in range(SLOW_SLOTS) for i in range(SLOW_TARGETS)]
            emits += [_delivery("fast", f"b{nth}-{n}", seed=200 + 1000 * nth + n) for n in range(FAST_BUNDLES)]
            beside, fast_done = await _burst(bus, fast, emits, fast_so_far + FAST_BUNDLES)
            for t in slow:  # the slow targets' records are all delivered all the same
                await wait_for(lambda t=t, n=slow_so_far + SLOW_SLOTS: _count_at_least(t, n),
                               timeout_s=30)
            # Each round starts with the stage at rest: no answer of this one still being recorded.
            await wait_for(idle, timeout_s=30)
            await asyncio.sleep(0.5)
            this_round = [req for t in slow for req in (await asyncio.to_thread(t.received))[slow_so_far:]]
            ahead = sum(1 for req in this_round if _arrival(req) < fast_done)
            rounds.append((alone, beside, ahead))
    # First come, first served, all 128 slow first attempts reached their targets before the fast target's last
    # Bundle, in every round; quick targets first, none (a step may still pass after GIVE_WAY_MAX_S).
    shown = ", ".join(f"{a * 1000:.0f} ms alone, {b * 1000:.0f} beside, {n} ahead" for a, b, n in rounds)
    assert all(n <= SLOW_TARGETS * SLOW_SLOTS // 4 for _, _, n in rounds), f"slow Bundles went first: {shown}"
    # And they are quick: beside the burst, the fast target's records still come behind 3.5 MB of slow ones in the
    # log (written and read before them), a few tens of ms, more on a loaded machine (CI: 80 ms alone, 348 beside
    # in one round, with the other test worker busy). A load spike hits one round; hence the best of the rounds.
    assert any(beside <= 2 * alone + 0.1 for alone, beside, _ in rounds), f"the fast target was delayed: {shown}"
    for t in targets:  # none lost, none twice: counted at each target, by content
        applied = [patient_identifier(r["body"]) for r in t.received() if r["applied"]]  # type: ignore[arg-type]
        assert len(applied) == len(set(applied)) == (1 + ROUNDS * (2 * FAST_BUNDLES if t is fast else SLOW_SLOTS))


PERSONS, PER_PERSON, LONE_SLOTS, SLOWED_S = 16, 2, 8, 1.2


async def test_a_lone_target_whose_answers_slow_down_never_waits_for_its_own_records(
        make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    lone = DemoTarget(tmp_path / "lone.log").start()
    try:
        settings = make_settings(kafka_bootstrap=None, embedded_log_path=tmp_path / "log.db", topic_partitions=6,
                                 log_level="warning")
        directory = TargetDirectory.model_validate({"targets": [
            {"id": "lone", "base_url": lone.fhir, "max_concurrency": LONE_SLOTS, "timeouts": {"total_s": 20}}]})
        async with delivering(settings, directory, tmp_path) as (bus, _):
            # Quick at first: its records are counted in as a quick target's ...
            await bus.publish([_delivery("lone", f"w{n}", seed=n, entries=5) for n in range(2)])
            await wait_for(lambda: _count_at_least(lone, 2), timeout_s=30)
            # ... then every answer takes SLOWED_S, past SLOW_MIN_S: its median soon says slow.
            await asyncio.to_thread(lone.fault, delay_s=SLOWED_S, count=-1)
            emits = [_delivery("lone", f"p{p}", seed=100 * p + n, entries=5)
                     for n in range(PER_PERSON) for p in range(PERSONS)]
            order = {e.envelope.transfer_id: (e.key, n // PERSONS) for n, e in enumerate(emits)}
            began = time.monotonic()
            await bus.publish(emits)
            await wait_for(lambda: _count_at_least(lone, 2 + len(emits)), timeout_s=60)
            elapsed = time.monotonic() - began
        received = [r for r in await _applied(lone) if _transfer(r) in order]
    finally:
        lone.stop()
    # Each person's Bundles one after the other, the persons side by side in the target's slots: about
    # (Bundles / slots) answers' time. Giving way to its own records (up to 1 s before each of three steps)
    # would add seconds per round (the reverted attempt: 8.0 s where this takes 5.0).
    ideal = PERSONS * PER_PERSON / LONE_SLOTS * SLOWED_S
    assert elapsed < ideal + 1.5, f"{len(emits)} Bundles took {elapsed:.1f} s, {ideal:.1f} s of answers"
    assert len(received) == len({_transfer(r) for r in received}) == len(emits)  # none lost, none twice
    for person in {key for key, _ in order.values()}:  # and in order, per person
        sequence = [order[_transfer(r)][1] for r in received if order[_transfer(r)][0] == person]
        assert sequence == sorted(sequence), f"{person!r} arrived out of order: {sequence}"
