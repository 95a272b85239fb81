"""Issue 15 end to end: a slow target holds no one, and `kill -9` while it is slow breaks no person's order.

Five DUIs (one per person) each send their person's Bundles one after the other, waiting for each 202,
to a fast and a slow target at once; the whole broker is killed at a random moment while the slow
target has POSTs in flight. What each target applied is read back from the target itself, by content:
the Bundle's own identifier says which person and which of their Bundles it is.
(tests/e2e/test_person_order.py: a flaky target; test_slow_target_kill.py: records parked in retry tiers.)
"""

from __future__ import annotations

import asyncio
import copy
import random
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.fixtures.tddui import make_bundle
from tests.support.embedded import EmbeddedRelais
from tests.support.processes import DemoTarget

pytestmark = pytest.mark.e2e
PERSONS = 5
HEADERS = {"Authorization": "Bearer demo-token", "Content-Type": "application/fhir+json"}


def person_bundles(person: int, count: int) -> list[dict[str, Any]]:
    """`count` Bundles of one person (the same usager identifiers), numbered in Bundle.identifier."""
    usager = next(e["resource"] for e in make_bundle(3, seed=90_000 + person)["entry"]
                  if e["resource"]["resourceType"] == "Patient")
    bundles = []
    for n in range(count):
        bundle = make_bundle(4, seed=91_000 + 100 * person + n)
        patient = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
        patient["identifier"] = copy.deepcopy(usager["identifier"])
        bundle["identifier"] = {"system": "urn:relais:test:order", "value": f"person-{person}/bundle-{n:02d}"}
        bundles.append(bundle)
    return bundles


def applied_in_order(target: DemoTarget) -> list[str]:
    """Bundle identifiers the target applied, in the order it applied them."""
    rows = sorted((r for r in target.received() if r["applied"]),
                  key=lambda r: datetime.fromisoformat(str(r["time"])))
    return [str(r["body"]["identifier"]["value"]) for r in rows]  # type: ignore[index]


def check_order_and_count(target: DemoTarget, sent: dict[int, list[str]], name: str) -> None:
    applied = applied_in_order(target)
    counts = Counter(applied)
    duplicates = {k: n for k, n in counts.items() if n > 1}
    missing = {b for bundles in sent.values() for b in bundles} - set(counts)
    assert not duplicates, f"{name}: applied more than once: {duplicates}"
    assert not missing, f"{name}: never applied: {sorted(missing)}"
    for person, bundles in sent.items():
        arrived = [b for b in applied if b.startswith(f"person-{person}/")]
        assert arrived == bundles, f"{name}: person {person}'s Bundles arrived out of order: {arrived}"


async def send_in_order(url: str, bundles: list[dict[str, Any]], targets: str, deadline_s: float = 240) -> None:
    """One DUI: each Bundle waits for the previous one's 202; a failed POST is sent again (same identifier)."""
    deadline = time.monotonic() + deadline_s
    async with httpx.AsyncClient(timeout=30) as client:
        for bundle in bundles:
            while True:
                assert time.monotonic() < deadline, "the broker never accepted every Bundle"
                try:
                    r = await client.post(f"{url}/fhir", content=orjson.dumps(bundle),
                                          headers={**HEADERS, "X-Relais-Target": targets})
                    if r.status_code == 202:
                        break
                except httpx.HTTPError:
                    pass  # the broker is being restarted: send it again, as a DUI would
                await asyncio.sleep(0.3)


@pytest.fixture
def two_targets(tmp_path: Path) -> Iterator[tuple[DemoTarget, DemoTarget]]:
    a, b = DemoTarget(tmp_path / "a.log").start(), DemoTarget(tmp_path / "b.log").start()
    yield a, b
    a.stop()
    b.stop()


async def until(condition: Any, timeout_s: float, what: str, explain: Any = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(condition):
        assert time.monotonic() < deadline, f"timed out waiting for {what}" + (f"\n{explain()}" if explain else "")
        await asyncio.sleep(0.3)


def test_a_slow_target_holds_no_one_else_and_kill_9_while_it_is_slow_loses_and_duplicates_nothing(
        tmp_path: Path, two_targets: tuple[DemoTarget, DemoTarget]) -> None:
    fast, slow = two_targets
    slow.fault(delay_s=4, count=-1)  # up and answering, four seconds a transaction
    # After the kill, an attempt the dead process left started waits until its POST cannot still be running (its
    # target's connect + total timeouts + 5 s) before it is probed: the fast target's bound is kept short (9 s) so
    # that wait does not outlast the slow target's 30 Bundles (5 persons' lanes, 6 × 4 s each).
    targets = tmp_path / "targets.yaml"
    targets.write_text(f"targets:\n  - {{id: fast, base_url: '{fast.fhir}', timeouts: {{connect_s: 1, total_s: 3}}}}\n"
                       f"  - {{id: slow, base_url: '{slow.fhir}', timeouts: {{connect_s: 1, total_s: 8}}}}\n")
    relais = EmbeddedRelais(tmp_path, targets_file=targets)
    relais.start()
    per_person = 6
    sent = {p: person_bundles(p, per_person) for p in range(PERSONS)}
    total = PERSONS * per_person

    async def scenario() -> None:
        sending = asyncio.gather(*(send_in_order(relais.url, b, "fast,slow") for b in sent.values()))
        # Kill the whole broker at a random moment while the slow target has POSTs in flight.
        await until(lambda: len(slow.received()) >= 3, 60, "the slow target to be busy", relais.log_tail)
        await asyncio.sleep(random.uniform(0.0, 2.0))
        await asyncio.to_thread(relais.kill9)
        await asyncio.to_thread(relais.start)
        await sending
        # The fast target gets everything while the slow one is still slow: nothing waits behind it.
        await until(lambda: len(set(applied_in_order(fast))) >= total, 60, "the fast target's Bundles",
                    relais.log_tail)
        assert len(set(applied_in_order(slow))) < total, "the slow target was not slow enough to prove anything"
        await asyncio.to_thread(httpx.delete, f"{slow.base_url}/_faults")  # it speeds up
        await until(lambda: len(set(applied_in_order(slow))) >= total, 120, "the slow target's Bundles",
                    relais.log_tail)
        await asyncio.sleep(2)  # anything still in flight or retrying would show as a duplicate now

    try:
        asyncio.run(scenario())
        order = {p: [b["identifier"]["value"] for b in bundles] for p, bundles in sent.items()}
        check_order_and_count(fast, order, "fast")
        check_order_and_count(slow, order, "slow")
    finally:
        assert relais.stop() == 0, relais.log_tail()
