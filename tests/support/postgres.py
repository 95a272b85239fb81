"""A throwaway PostgreSQL cluster from the Debian binaries, for ledger tests on the production database.

`initdb` + `pg_ctl` in a temporary directory on a free port, run as the `postgres` system user when
we are root (PostgreSQL refuses to run as root). Locally the tests skip when PostgreSQL cannot be had
(`apt-get install -y postgresql`); in CI (CI=true) they fail instead.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.processes import free_port

REQUIRED = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _unavailable(why: str) -> None:
    message = f"no PostgreSQL for the ledger tests: {why} (apt-get install -y postgresql)"
    if REQUIRED:
        pytest.fail(message + "; PostgreSQL tests are required in CI")
    pytest.skip(message)


@dataclass
class PostgresCluster:
    """A running cluster: create a fresh database per test with `new_database()`."""

    bindir: Path
    port: int
    socket_dir: Path

    def psql(self, sql: str) -> None:
        subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "postgres",
                        "-v", "ON_ERROR_STOP=1", "-q", "-c", sql], check=True, capture_output=True, timeout=30)

    def new_database(self) -> str:
        """A new empty database; its SQLAlchemy async URL."""
        name = f"relais_{uuid.uuid4().hex[:10]}"
        self.psql(f"CREATE DATABASE {name}")
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{name}"


def _as_postgres(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    if shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--", *argv]
    return ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(argv)]


def start_cluster() -> Iterator[PostgresCluster]:
    """Start a cluster for the session and remove it afterwards."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        _unavailable("no /usr/lib/postgresql/*/bin/initdb")
    bindir = Path(found[-1]).parent
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            _unavailable("no 'postgres' system user to run the server as")
    workdir = Path(tempfile.mkdtemp(prefix="relais-pg-"))
    data = workdir / "data"
    if os.geteuid() == 0:
        shutil.chown(workdir, "postgres", "postgres")
    port = free_port()
    try:
        subprocess.run(_as_postgres([str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                                     "--no-sync", "-E", "UTF8"]), check=True, capture_output=True, timeout=120)
        options = f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
        subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l",
                                     str(workdir / "server.log"), "-w", "-t", "60", "start"]),
                       check=True, capture_output=True, timeout=90)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        log = (workdir / "server.log").read_text(errors="replace")[-2000:] if (workdir / "server.log").exists() else ""
        stderr = getattr(exc, "stderr", b"") or b""
        shutil.rmtree(workdir, ignore_errors=True)
        _unavailable(f"cannot start PostgreSQL: {exc} {stderr.decode(errors='replace')[-1000:]} {log}")
    try:
        yield PostgresCluster(bindir, port, workdir)
    finally:
        subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                       capture_output=True, timeout=60, check=False)
        shutil.rmtree(workdir, ignore_errors=True)
