"""Free space on the local disks Relais writes to: a full disk is seen before a write fails, not after.

A write probe alone does not reveal a full disk: SQLite reuses its free pages and the room its WAL file
already holds, so a probe row (or a small record) still commits while a delivery's journal row, a blob
or a dead letter fails with ENOSPC. Measured on a full tmpfs under `relais run`: the ingress kept
answering 202 and /readyz kept saying ready while every worker stage was stalled on `disk is full`.
So readiness and admission also ask the filesystem how much room is left.

Which paths: the embedded log (when no Kafka is configured), a SQLite ledger file, and the local blob
directory (unless blobs go to S3). Kafka, PostgreSQL and S3 report their own storage faults.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from sqlalchemy.engine import make_url

from services.core.settings import Settings

MiB = 1024 * 1024
# Below this much free space a disk counts as full: room kept for what was already accepted (journal rows,
# dead letters, the tracker's projection) rather than spent on new transfers that could then not move.
MIN_FREE_BYTES = 1 * MiB


def local_data_paths(settings: Settings) -> list[Path]:
    """The local files and directories these settings make Relais write to."""
    paths = []
    if not settings.kafka_bootstrap:
        paths.append(Path(settings.embedded_log_path))
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        paths.append(Path(url.database))
    if not settings.blob_s3_endpoint:
        paths.append(Path(settings.blob_dir))
    return paths


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding `path` (or its nearest existing parent)."""
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    stat = os.statvfs(probe)
    return stat.f_bavail * stat.f_frsize


def full_disks(free: Mapping[Path, int], reserve: int = MIN_FREE_BYTES) -> str | None:
    """Why storage is full (naming each path and what is left), or None when every path has room. Pure."""
    full = [f"{path} ({left // 1024} KiB free)" for path, left in free.items() if left < reserve]
    if not full:
        return None
    return (f"disk-full: less than {reserve // MiB} MiB free for " + ", ".join(full)
            + "; free space there (records wait and resume by themselves)")


def disk_problem(paths: Iterable[Path], reserve: int = MIN_FREE_BYTES) -> str | None:
    """`full_disks` for these paths, now; a path whose filesystem cannot be asked is left to the write probes."""
    free = {}
    for path in paths:
        try:
            free[path] = free_bytes(path)
        except OSError:
            continue
    return full_disks(free, reserve)
