"""What the ingress's request handlers share (`app.state.ingress`), and its background duties."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request

from services.core import diskspace
from services.core.bus import Bus
from services.core.embedded import STORAGE_UNWRITABLE
from services.core.errors import ConfigurationError
from services.core.logging import get_logger
from services.core.settings import Settings
from services.core.targets import TargetDirectory
from services.ingress import limits, submissions
from services.ingress.mtls import ClientCertPolicy
from services.ingress.producers import ProducerDirectory, load_producers
from services.tracker.ledger import Ledger

log = get_logger(__name__)

BUS_RETRY_S = 2.0
STORAGE_CHECK_S = 0.25


@dataclass
class IngressState:
    """What request handlers share: configuration, the bus and the ledger."""

    settings: Settings
    producers: ProducerDirectory | None  # None: authentication explicitly disabled
    targets: TargetDirectory
    bus: Bus
    ledger: Ledger
    bus_ready: asyncio.Event = field(default_factory=asyncio.Event)
    limiter: limits.ProducerLimiter = field(default_factory=limits.ProducerLimiter)
    cert_policy: ClientCertPolicy | None = None  # mutual TLS: client certificates checked against the CA
    background: submissions.Background = field(default_factory=lambda: submissions.Background())
    data_paths: list[Path] = field(default_factory=list)  # local disks to keep room on (services/core/diskspace.py)
    _storage_checked: float = float("-inf")
    _storage_problem: str | None = None

    @classmethod
    def build(cls, settings: Settings, bus: Bus, ledger: Ledger, targets: TargetDirectory) -> IngressState:
        """The state of an ingress on these shared resources, with the producers file read now."""
        return cls(settings, load_producer_directory(settings), targets, bus, ledger,
                   limiter=limits.ProducerLimiter.from_settings(settings),
                   cert_policy=ClientCertPolicy(settings) if settings.tls_client_ca_file else None,
                   data_paths=diskspace.local_data_paths(settings))

    def storage_full(self) -> str | None:
        """Why the local disks are too full to take new work, or None (and relais_storage_unwritable says so).

        Asked again at most every STORAGE_CHECK_S (three statvfs per POST were 6% of the ingress's CPU under
        load); diskspace.MIN_FREE_BYTES is the room for what is accepted meanwhile."""
        now = time.monotonic()
        if now >= self._storage_checked + STORAGE_CHECK_S:
            self._storage_problem = diskspace.disk_problem(self.data_paths)
            self._storage_checked = now
            STORAGE_UNWRITABLE.labels("data-disk", "disk-full").set(0 if self._storage_problem is None else 1)
        return self._storage_problem

    def reload_producers(self) -> None:
        """Read the producers file again (raises ConfigurationError, keeping the old one, when invalid)."""
        if self.settings.producers_file is not None:
            self.producers = load_producers(self.settings.producers_file)

    async def connect_bus(self) -> None:
        """Start the bus, retrying until Kafka answers; until then POST /fhir answers 503."""
        while True:
            try:
                await self.bus.start()
                self.bus_ready.set()
                log.info("ingress connected to the bus")
                return
            except Exception as exc:  # noqa: BLE001 - any start failure means "not yet"; keep trying
                log.warning("bus not reachable yet; POST /fhir answers 503 meanwhile", error=str(exc))
                await asyncio.sleep(BUS_RETRY_S)

    async def purge_submissions(self) -> None:
        """Forget idempotency keys past their window, now and then (every replica may; it is idempotent)."""
        window = self.settings.idempotency_window_s
        while True:
            await asyncio.sleep(min(window / 10, 600.0))
            try:
                await submissions.purge(self.ledger, window)
            except Exception as exc:  # noqa: BLE001 - a ledger hiccup: try again next round
                log.warning("could not purge expired idempotency keys", error=str(exc))


def ingress_state(request: Request) -> IngressState:
    """The ingress state of the app serving `request` (set by services.app)."""
    state: IngressState = request.app.state.ingress
    return state


def load_producer_directory(settings: Settings) -> ProducerDirectory | None:
    """The producers file, or None when auth is explicitly disabled; refuses to guess otherwise."""
    if settings.producers_file is not None:
        return load_producers(settings.producers_file)
    if settings.auth_disabled:
        log.warning("producer authentication is DISABLED (RELAIS_AUTH_DISABLED=true); development only")
        return None
    raise ConfigurationError(
        "ingress will not start without producer authentication: set RELAIS_PRODUCERS_FILE to a YAML "
        "file of producers (see README, 'Producers'), or set RELAIS_AUTH_DISABLED=true for local development"
    )
