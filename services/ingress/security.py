"""Who is calling, for which structure: producer identity (token, client certificate or both) and
authorization by FINESS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from services.http.auth import bearer_token, note_refusal
from services.http.reload import Reloader
from services.ingress import checks
from services.ingress.checks import Refusal
from services.ingress.mtls import PEER_CERT, ClientCertificate, ClientCertPolicy, parse_certificate
from services.ingress.producers import ANONYMOUS, Producer, ProducerDirectory
from services.ingress.state import IngressState
from services.router.logic import transfer_info


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated producer and how it proved who it is."""

    producer: Producer
    method: str  # "token", "mtls", "both" or "none" (authentication disabled)
    cert_fingerprint: str | None = None


def caller(state: IngressState, request: Request) -> Identity:
    """Who is calling the ingress (POST /fhir, the status URL, $validate): the producers file is re-read
    first when it changed; with authentication disabled, everyone is the anonymous producer."""
    reloader: Reloader | None = getattr(request.app.state, "reloader", None)
    if reloader is not None:
        reloader.maybe()
    if state.producers is None:
        return Identity(ANONYMOUS, "none")
    return identify(state.producers, state.cert_policy, request)


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
    token = bearer_token(request.headers.get("Authorization"))
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
