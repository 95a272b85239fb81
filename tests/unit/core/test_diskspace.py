"""Which local paths Relais writes to, and when their disks count as full (services/core/diskspace.py)."""

from __future__ import annotations

from pathlib import Path

from services.core.diskspace import MiB, disk_problem, full_disks, local_data_paths
from services.core.settings import Settings


def test_a_disk_under_the_reserve_is_full_and_named_with_what_is_left() -> None:
    assert full_disks({Path("/a"): 10 * MiB, Path("/b"): 2 * MiB}, reserve=1 * MiB) is None
    why = full_disks({Path("/a"): 10 * MiB, Path("/b"): 512 * 1024}, reserve=1 * MiB)
    assert why is not None and why.startswith("disk-full") and "/b (512 KiB free)" in why and "/a" not in why


def test_the_local_paths_follow_the_bus_ledger_and_blob_store(tmp_path: Path) -> None:
    embedded = Settings(kafka_bootstrap=None, embedded_log_path=tmp_path / "log.db", blob_dir=tmp_path / "blobs",
                        database_url=f"sqlite+aiosqlite:///{tmp_path}/ledger.db")
    assert local_data_paths(embedded) == [tmp_path / "log.db", tmp_path / "ledger.db", tmp_path / "blobs"]
    remote = Settings(kafka_bootstrap="k:9092", database_url="postgresql+asyncpg://u:p@h/db",
                      blob_s3_endpoint="https://s3", blob_s3_bucket="b")
    assert local_data_paths(remote) == []


def test_a_path_not_created_yet_is_measured_on_its_nearest_parent(tmp_path: Path) -> None:
    assert disk_problem([tmp_path / "not" / "yet" / "log.db"], reserve=1) is None
    assert disk_problem([tmp_path], reserve=1 << 62) is not None
