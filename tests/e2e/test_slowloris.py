"""Header slow-loris with 1,024 file descriptors: a good client still gets its 202 at once, the log stays small.

Ingress is served by uvicorn exactly as the launcher builds it (`services.launcher._server`), on the
embedded log, with the process's descriptor limit lowered to 1,024 (the fault campaign's). 1,500
connections from another process trickle their request headers one line a second and reconnect
when closed. A good client must get its 202 in under a second throughout (95th percentile; see the
assertion), accept() must never run out of descriptors, and the log written meanwhile (structlog and
the standard library, as configured in production) must stay under 1 MB.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from services.core.logging import configure_logging
from services.core.settings import Settings
from tests.fixtures.tddui import make_bundle
from tests.support.ingress import serving
from tests.support.processes import REPO, free_port
from tests.support.producers import TOKEN_A, write_producers, write_targets

pytestmark = pytest.mark.e2e
ATTACKERS = 1500
ATTACK_S = 15.0


@contextlib.contextmanager
def descriptor_limit(soft: int) -> Iterator[None]:
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


@contextlib.contextmanager
def log_into(buffer: io.StringIO, settings: Settings) -> Iterator[None]:
    """Production logging (JSON, one chain) written to `buffer` instead of stderr."""
    real = sys.stderr
    sys.stderr = buffer  # configure_logging wraps whatever stderr is
    try:
        configure_logging(settings)
        yield
    finally:
        sys.stderr = real
        logging.basicConfig(stream=real, force=True)


async def test_a_good_client_gets_its_202_in_under_a_second_during_a_header_slow_loris(
        make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    port = free_port()
    settings = make_settings(http_port=port, embedded_log_path=tmp_path / "log.db", auth_disabled=False,
                             producers_file=write_producers(tmp_path / "p.yaml"), http_header_timeout_s=5,
                             targets_file=write_targets(tmp_path / "t.yaml", {"essms-a": "http://127.0.0.1:9/fhir"}),
                             log_format="json", log_level="info")
    headers = {"Content-Type": "application/fhir+json", "Authorization": f"Bearer {TOKEN_A}",
               "X-Relais-Target": "essms-a"}
    log = io.StringIO()
    latencies: list[float] = []
    with descriptor_limit(1024), log_into(log, settings):
        async with serving(settings, f"http://127.0.0.1:{port}") as url:
            attack = subprocess.Popen([sys.executable, "-m", "tests.support.slowloris", str(port), str(ATTACKERS),
                                       str(ATTACK_S + 4)], cwd=REPO, stdout=subprocess.PIPE, text=True)
            try:
                await asyncio.sleep(3)  # the 1,500 connect and start trickling
                logged_before = log.tell()
                # A new connection each time, like a DUI that has not talked to Relais for a while.
                async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_keepalive_connections=0)) as client:
                    deadline = time.monotonic() + ATTACK_S
                    while time.monotonic() < deadline:
                        body = orjson.dumps(make_bundle(3, seed=70_000 + len(latencies)))
                        started = time.monotonic()
                        answer = await client.post(f"{url}/fhir", content=body, headers=headers)
                        latencies.append(time.monotonic() - started)
                        assert answer.status_code == 202, answer.text
                        await asyncio.sleep(0.5)
            finally:
                out, _ = await asyncio.to_thread(attack.communicate, timeout=60)
    assert int(out.strip()) >= ATTACKERS, out  # the attack really ran (with its reconnections)
    assert len(latencies) >= 10
    ranked = sorted(latencies)
    # Every answer under a second is the promise; on a loaded 2-core CI machine a lone sample can take
    # longer with no attack at all (CPU starvation: 0.76 s seen), so the 95th percentile holds the line
    # and the worst case must still be nowhere near the seconds an accept() pause or a dropped SYN costs.
    assert ranked[int(len(ranked) * 0.95) - 1] < 1.0, ranked
    assert ranked[-1] < 2.0, ranked
    assert "out of system resource" not in log.getvalue()  # accept() never ran out of descriptors
    grown = len(log.getvalue()) - logged_before
    assert grown < 1024 * 1024, f"the log grew {grown} bytes during the attack"
