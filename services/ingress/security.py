"""Who is calling, for which structure: producer identity (token, client certificate or both) and
authorization by FINESS; producers and operators files re-read when they change, without restart.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.from_thread
from fastapi import FastAPI, Request

from services.core.errors import ConfigurationError
from services.core.logging import get_logger
from services.core.settings import Settings
from services.ingress import checks
from services.ingress.checks import Refusal
from services.ingress.mtls import PEER_CERT, ClientCertificate, ClientCertPolicy, parse_certificate
from services.ingress.producers import Producer, ProducerDirectory, load_producers
from services.router.logic import transfer_info
from services.tracker import audit

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated producer and how it proved who it is."""

    producer: Producer
    method: str  # "token", "mtls", "both" or "none" (authentication disabled)
    cert_fingerprint: str | None = None


def peer_certificate(request: Request) -> ClientCertificate | None:
    """The client certificate of the request's TLS connection, if one was presented (a 401 Refusal when it
    cannot even be parsed: a presented certificate is never ignored)."""
    der = getattr(request.state, PEER_CERT, None)
    if not der:
        return None
    try:
        return parse_certificate(der)
    except ValueError:
        raise checks.unauthenticated("the client certificate cannot be parsed") from None


def identify(directory: ProducerDirectory, policy: ClientCertPolicy | None, request: Request) -> Identity:
    """The producer making this request, per its `auth` method; raises a 401 Refusal otherwise (recorded in
    the audit trail, rate-limited).

    A certificate that is presented and fails validation (revoked, expired, unknown CA) is refused whatever
    else the request carries, a valid token included. Otherwise:

    * `token`: a known bearer token (a valid certificate alongside it is not required, nor checked against
      the producer);
    * `mtls`: a client certificate from the configured CA, not revoked, registered to the producer;
    * `both`: the token names the producer and the certificate must be registered to that same producer.
    """
    try:
        return _identify(directory, policy, request)
    except Refusal as refusal:
        note_refusal(request, "ingress", refusal.status, _text(refusal))
        raise


def _identify(directory: ProducerDirectory, policy: ClientCertPolicy | None, request: Request) -> Identity:
    token = checks.bearer_token(request.headers.get("Authorization"))
    cert = peer_certificate(request) if policy is not None and policy.enabled else None
    cert_problem = policy.refusal(cert) if cert is not None and policy is not None else None
    if cert_problem:
        raise checks.unauthenticated(cert_problem)
    if token is not None:
        producer = directory.authenticate(token)
        if producer is None:
            raise checks.unauthenticated("unknown or revoked token: check the producer token this DUI uses")
        if producer.auth == "token":
            return Identity(producer, "token", cert.fingerprint_sha256 if cert is not None else None)
        _require_cert(producer, cert)
        assert cert is not None
        return Identity(producer, "both", cert.fingerprint_sha256)
    if cert is not None:
        producer = directory.by_certificate(cert.fingerprint_sha256, cert.subject)
        if producer is None:
            raise checks.unauthenticated("this client certificate is not registered to any producer "
                                         "(cert_fingerprints_sha256 / cert_subjects in the producers file)")
        if producer.auth == "both":
            raise checks.unauthenticated(f"producer '{producer.id}' must also send its bearer token")
        return Identity(producer, "mtls", cert.fingerprint_sha256)
    raise checks.unauthenticated("missing credentials: send 'Authorization: Bearer <producer token>'"
                                 + (" or a client certificate" if policy is not None and policy.enabled else ""))


def _text(refusal: Refusal) -> str:
    return "; ".join(str(i.diagnostics) for i in refusal.issues)[:300]


def note_refusal(request: Request, surface: str, status: int, reason: str) -> None:
    """Record a failed authentication (401/403) in the audit trail, at most once per client, surface and
    reason per RELAIS_AUDIT_REFUSAL_EVERY_S; never delays or fails the refusal itself."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # a sync FastAPI dependency runs in a worker thread: note it on the event loop
        anyio.from_thread.run_sync(functools.partial(note_refusal, request, surface, status, reason))
        return
    state = request.app.state
    refusals = getattr(state, "auth_refusals", None)
    if refusals is None:
        ops = getattr(state, "ops", None)
        if ops is None:
            return  # an app without the operator side has no audit trail to write to
        refusals = audit.Refusals(ops.ledger, ops.settings.audit_refusal_every_s)
        state.auth_refusals = refusals
    refusals.note(surface, status, reason, client=request.client.host if request.client else None,
                  path=request.url.path)


def _require_cert(producer: Producer, cert: ClientCertificate | None) -> None:
    if cert is None:
        raise checks.unauthenticated(f"producer '{producer.id}' must present its client certificate (mutual TLS)")
    if not producer.matches_certificate(cert.fingerprint_sha256, cert.subject):
        raise checks.unauthenticated(f"this client certificate is not registered to producer '{producer.id}'")


def source_finess(bundle: dict[str, Any]) -> list[str]:
    """The FINESS numbers of the Bundle's Organization(s) (TDDUIOrganization), sorted."""
    return sorted(transfer_info(bundle, (), None).finess)


def check_structure(producer: Producer, finess: Sequence[str]) -> Refusal | None:
    """403 unless every Organization FINESS of the Bundle is one the producer is registered for."""
    if producer.finess is None:
        return None
    if not finess:
        return checks.refuse(403, "forbidden", f"producer '{producer.id}' is registered for FINESS "
                             f"{', '.join(sorted(producer.finess))}, and this Bundle names no Organization with a "
                             "FINESS identifier", "Bundle.entry.resource.ofType(Organization).identifier",
                             rule="relais-ingress-structure")
    foreign = [f for f in finess if not producer.may_send_for(f)]
    if foreign:
        return checks.refuse(403, "forbidden", f"producer '{producer.id}' is not registered for FINESS "
                             f"{', '.join(foreign)}: a DUI sends only for its own structures",
                             "Bundle.entry.resource.ofType(Organization).identifier",
                             rule="relais-ingress-structure")
    return None


class FileWatch:
    """A file's modification time, checked on demand: `changed()` is True once per change."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.stamp = self._stat()

    def _stat(self) -> float | None:
        if self.path is None:
            return None
        try:
            return os.stat(self.path).st_mtime_ns
        except OSError:
            return None

    def changed(self) -> bool:
        """True when the file's mtime moved since the last call (or construction)."""
        stamp = self._stat()
        if stamp is None or stamp == self.stamp:
            return False
        self.stamp = stamp
        return True


class Reloader:
    """Re-reads the producers and operators files of a running ingress when they change."""

    def __init__(self, app: FastAPI, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.producers = FileWatch(settings.producers_file)
        self.operators = FileWatch(settings.operators_file)
        self._next = time.monotonic() + settings.auth_reload_s

    def maybe(self) -> None:
        """Check at most every RELAIS_AUTH_RELOAD_S (cheap enough to call on every request)."""
        if time.monotonic() >= self._next:
            self._next = time.monotonic() + self.settings.auth_reload_s
            self.now()

    def now(self) -> None:
        """Check both files at once; a file that became invalid is logged and the old content kept."""
        state = self.app.state.ingress
        if self.settings.producers_file is not None and self.producers.changed():
            try:
                state.producers = load_producers(self.settings.producers_file)
                log.info("producers file reloaded", producers=len(state.producers.producers))
            except ConfigurationError as exc:
                log.error("producers file changed but is invalid; keeping the previous producers", error=str(exc))
        if self.settings.operators_file is not None and self.operators.changed():
            from services.ops.auth import load_operators

            try:
                self.app.state.operators = load_operators(self.settings)
                log.info("operators file reloaded")
            except ConfigurationError as exc:
                log.error("operators file changed but is invalid; keeping the previous operators", error=str(exc))

    async def run(self) -> None:
        """Background loop for the app's lifespan (so /ops sees changes even without producer traffic)."""
        while True:
            await asyncio.sleep(self.settings.auth_reload_s)
            self.maybe()
