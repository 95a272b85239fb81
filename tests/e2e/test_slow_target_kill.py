"""`kill -9` while a slow target's records wait (its own area, retry tiers): none lost, none twice (issue 15)."""

from __future__ import annotations

import asyncio
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
AUTH = {"Authorization": "Bearer demo-token"}
COUNT = 12


async def test_kill_9_while_a_slow_targets_records_wait_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    fast, slow = DemoTarget(tmp_path / "fast.log").start(), DemoTarget(tmp_path / "slow.log").start()
    slow.fault(delay_s=2, count=-1)
    targets_file = tmp_path / "targets.yaml"
    targets_file.write_text(  # 1 at a time, 3 waiting at most 3 s: the rest parked in retry tiers
        "targets:\n"
        f"  - id: fast\n    base_url: {fast.fhir}\n"
        f"  - id: slow\n    base_url: {slow.fhir}\n    max_concurrency: 1\n"
        "    backlog: {records: 3, wait_s: 3, overflow: wait}\n", encoding="utf-8")
    relais = EmbeddedRelais(tmp_path, targets_file=targets_file)
    accepted: list[str] = []
    try:
        relais.start()
        async with httpx.AsyncClient(timeout=30) as client:
            for n in range(COUNT):
                r = await client.post(f"{relais.url}/fhir", content=orjson.dumps(make_bundle(3, seed=700 + n)),
                                      headers={**AUTH, "Content-Type": "application/fhir+json",
                                               "X-Relais-Target": "fast,slow"})
                assert r.status_code == 202, r.text
                accepted.append(r.headers["X-Relais-Transfer-Id"])
            await _until(lambda: len(_applied(fast)) >= COUNT and len(_applied(slow)) >= 2, 60, relais)
            assert len(_applied(slow)) < COUNT, "the slow phase was over before the kill"
            relais.kill9()  # some of the slow target's records in memory, some parked, one maybe in flight
            httpx.delete(f"{slow.base_url}/_faults", timeout=10).raise_for_status()  # it speeds up
            relais.start()
            await _until(lambda: len(_applied(slow)) >= COUNT, 120, relais)
            await asyncio.sleep(2)  # a duplicate would arrive now
    finally:
        relais.stop()
        rows = {"fast": _applied(fast), "slow": _applied(slow)}
        fast.stop()
        slow.stop()
    for name, applied in rows.items():
        transfers = [str(r["request_id"]).split("/")[0] for r in applied]
        assert sorted(transfers) == sorted(accepted), f"{name}: lost or applied twice"


async def _until(condition: Any, timeout_s: float, relais: EmbeddedRelais) -> None:
    for _ in range(int(timeout_s * 4)):
        if condition():
            return
        await asyncio.sleep(0.25)
    raise AssertionError(f"not reached within {timeout_s}s\n{relais.log_tail()}")


def _applied(target: DemoTarget) -> list[dict[str, Any]]:
    rows = [r for r in target.received() if r["applied"]]
    return sorted(rows, key=lambda r: datetime.fromisoformat(str(r["time"])))
