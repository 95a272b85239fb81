"""A worker process's /readyz: ready while its bus takes writes and its stages run; 503 saying why otherwise."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx

from services.core.embedded import EmbeddedBus
from services.core.settings import Settings
from services.workerhttp import worker_app

Factory = Callable[..., Settings]


async def test_worker_readyz_says_what_is_wrong(make_settings: Factory, tmp_path: Path) -> None:
    settings = make_settings(kafka_bootstrap=None, embedded_log_path=tmp_path / "log.db")
    bus = EmbeddedBus(settings)
    await bus.start()
    running = ["validator", "tracker"]
    app = worker_app(bus, [tmp_path], lambda: list(running), ["validator", "tracker"])
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://worker") as client:
            ready = await client.get("/readyz")
            assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text
            assert (await client.get("/healthz")).status_code == 200
            assert "relais_" in (await client.get("/metrics")).text

            running.remove("tracker")  # its loop ended
            stopped = await client.get("/readyz")
            assert stopped.status_code == 503 and stopped.json()["stages"] == {"validator": True, "tracker": False}
            assert "tracker" in stopped.json()["status"]
            running.append("tracker")

            log_files = [tmp_path / "log.db", tmp_path / "log.db-wal"]  # not -shm: it is mmapped (SIGBUS)
            subprocess.run(["chattr", "+i", *map(str, log_files)], check=True)  # as a read-only remount would
            try:
                bus.log.last_write_ok = 0.0  # nothing written lately: /readyz writes a probe
                unwritable = await client.get("/readyz")
            finally:
                subprocess.run(["chattr", "-i", *map(str, log_files)], check=True)
            assert unwritable.status_code == 503 and unwritable.json()["storage"] != "ok", unwritable.text
    finally:
        await bus.stop()
