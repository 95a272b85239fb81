"""A delivery stage running on the real runner and bus, for integration tests that publish deliveries to it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from services.core.blobstore import LocalBlobStore
from services.core.bus import Bus
from services.core.buses import make_bus
from services.core.runner import run_stage
from services.core.settings import Settings
from services.core.targets import TargetDirectory
from services.delivery.journal import AttemptJournal
from services.delivery.stage import DeliveryStage
from services.tracker.ledger import Ledger


@contextlib.asynccontextmanager
async def delivering(settings: Settings, directory: TargetDirectory,
                     work: Path) -> AsyncIterator[tuple[Bus, DeliveryStage]]:
    """Yields the bus to publish deliveries on, and the running stage; stops and closes them all after."""
    ledger = Ledger(settings.database_url)
    await ledger.create_schema()
    bus = make_bus(settings)
    await bus.start()
    stage = DeliveryStage(settings, directory, LocalBlobStore(work / "blobs"), AttemptJournal(ledger))
    stop = asyncio.Event()
    task = asyncio.create_task(run_stage(stage, bus, settings, stop))
    try:
        yield bus, stage
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await stage.aclose()
        await bus.stop()
        await ledger.close()
