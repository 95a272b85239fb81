"""A log line that cannot be written never fails a request; a storage fault answers 503 + OperationOutcome."""

from __future__ import annotations

import asyncio
import errno
import io
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import orjson
import pytest

from services.app import create_app
from services.core.embedded import EmbeddedBus
from services.core.envelope import Emit
from services.core.logging import configure_logging
from services.core.settings import Settings
from services.tracker.ledger import Ledger
from tests.fixtures.tddui import make_bundle

HEADERS = {"Content-Type": "application/fhir+json", "X-Relais-Target": "essms-a"}


class FullDisk(io.StringIO):
    def write(self, _: str) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


class FullDiskBus(EmbeddedBus):
    """The embedded log on a full disk: every publish fails with ENOSPC."""

    async def publish(self, emits: Sequence[Emit]) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize(("bus_class", "status"), [(EmbeddedBus, 202), (FullDiskBus, 503)])
async def test_with_the_log_on_a_full_disk_ingress_answers_fhir_never_a_plain_500(
        make_settings: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        bus_class: type[EmbeddedBus], status: int) -> None:
    from tests.support.producers import write_targets

    settings = make_settings(embedded_log_path=tmp_path / "log.db", log_format="json",
                             targets_file=write_targets(tmp_path / "t.yaml", {"essms-a": "http://127.0.0.1:9/fhir"}))
    monkeypatch.setattr(sys, "stderr", FullDisk())
    configure_logging(settings)
    try:
        app = create_app(settings, bus_class(settings), Ledger(settings.database_url))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://relais.test") as client:
                for _ in range(100):
                    if (await client.get("/readyz")).status_code == 200:
                        break
                    await asyncio.sleep(0.05)
                answer = await client.post("/fhir", content=orjson.dumps(make_bundle(3, seed=5)), headers=HEADERS)
    finally:
        monkeypatch.undo()
        logging.basicConfig(stream=sys.stderr, force=True)
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/fhir+json")
    assert answer.json()["resourceType"] == "OperationOutcome"
    if status == 503:
        assert answer.headers["Retry-After"]
