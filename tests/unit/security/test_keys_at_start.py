"""What a process checks about encryption keys when it starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

from services.core.blobstore import LocalBlobStore
from services.core.crypto import Keyring, new_key, parse_keys
from services.core.embedded import EmbeddedBus
from services.core.errors import ConfigurationError
from services.core.settings import Settings
from services.keyrotation import check_keys_at_start, rotate

OLD, NEW = new_key("old"), new_key("new")


def settings(tmp_path: Path, keys: str | None) -> Settings:
    return Settings(encryption_keys=keys, blob_dir=tmp_path / "blobs", embedded_log_path=tmp_path / "log.db",
                    database_url=f"sqlite+aiosqlite:///{tmp_path}/ledger.db")


async def test_encryption_off_is_said_at_start_naming_the_setting(tmp_path: Path) -> None:
    with capture_logs() as logs:
        await check_keys_at_start(None, settings(tmp_path, None))
    assert any(e["log_level"] == "warning" and "RELAIS_ENCRYPTION_KEYS_FILE" in e["event"] for e in logs), logs
    with capture_logs() as logs:
        await check_keys_at_start(None, settings(tmp_path, NEW))
    assert not [e for e in logs if e["log_level"] == "warning"]


async def test_a_removed_key_still_sealing_blobs_stops_the_start_until_rotated(tmp_path: Path) -> None:
    await LocalBlobStore(tmp_path / "blobs", Keyring(parse_keys(OLD, "t"))).put(b"live dead letter")
    bus = EmbeddedBus(settings(tmp_path, NEW))
    await bus.start()
    try:
        with pytest.raises(ConfigurationError, match=r"key\(s\) no longer configured \(key 'old': 1 blobs\).*"
                                                     r"relais keys rotate"):
            await check_keys_at_start(bus, settings(tmp_path, NEW))
    finally:
        await bus.stop()
    done = await rotate(settings(tmp_path, f"{NEW},{OLD}"))
    assert (done.blobs, done.blobs_total) == (1, 1)
    bus = EmbeddedBus(settings(tmp_path, NEW))
    await bus.start()
    try:
        await check_keys_at_start(bus, settings(tmp_path, NEW))
    finally:
        await bus.stop()
