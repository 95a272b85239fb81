"""Mutual TLS at the ingress over real sockets (uvicorn as `relais ingress` runs it), with certificates
generated here: a registered client is accepted; an unknown CA, an expired, a revoked or an unregistered
certificate is refused; `auth: both` needs token and certificate; files rotate without restart."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from services.core.settings import Settings
from services.tracker import audit, auditchain
from services.tracker.ledger import Ledger
from tests.fixtures.tddui import make_bundle, organization_finess
from tests.support.ingress import serving as serve_ingress
from tests.support.kafka import wait_for
from tests.support.processes import free_port
from tests.support.producers import write_targets
from tests.support.tls import Ca, Client, make_ca

TOKEN_BOTH = "token-of-the-both-producer"
TOKEN_PLAIN = "token-of-the-plain-producer"
BUNDLE = make_bundle(4, seed=11)
FINESS = organization_finess(BUNDLE)


class Pki:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca: Ca = make_ca(root, "structure-ca")
        self.stranger: Ca = make_ca(root, "stranger-ca")
        self.server = self.ca.issue(root, "server", server=True)
        self.good = self.ca.issue(root, "dui-mtls")
        self.both = self.ca.issue(root, "dui-both")
        self.expired = self.ca.issue(root, "dui-expired", expired=True)
        self.foreign = self.stranger.issue(root, "dui-foreign")
        self.crl_revoked = self.ca.issue(root, "dui-crl-revoked")
        self.fp_revoked = self.ca.issue(root, "dui-fp-revoked")
        self.unregistered = self.ca.issue(root, "dui-unregistered")
        self.crl = self.ca.crl(root / "ca.crl", [self.crl_revoked])


def producers_yaml(pki: Pki, *, good_fingerprint: str | None = None) -> str:
    sha = lambda t: hashlib.sha256(t.encode()).hexdigest()  # noqa: E731
    return f"""producers:
  - id: dui-mtls
    auth: mtls
    cert_fingerprints_sha256: ["{good_fingerprint or pki.good.fingerprint}"]
    finess: ["{FINESS}"]
  - id: dui-both
    auth: both
    token_sha256: {sha(TOKEN_BOTH)}
    cert_subjects: ["{pki.both.subject}"]
  - id: dui-plain
    token_sha256: {sha(TOKEN_PLAIN)}
  - id: dui-revoked
    auth: mtls
    cert_fingerprints_sha256: ["{pki.crl_revoked.fingerprint}", "{pki.fp_revoked.fingerprint}"]
  - id: dui-expired
    auth: mtls
    cert_fingerprints_sha256: ["{pki.expired.fingerprint}"]
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def serving(settings: Settings) -> contextlib.AbstractAsyncContextManager[str]:
    return serve_ingress(settings, f"https://localhost:{settings.http_port}")


@pytest.fixture
def make(tmp_path: Path, pki: Pki) -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        producers = tmp_path / "producers.yaml"
        if not producers.exists():
            producers.write_text(producers_yaml(pki))
        values: dict[str, Any] = {
            "http_port": free_port(), "database_url": f"sqlite+aiosqlite:///{tmp_path}/ledger.db",
            "embedded_log_path": tmp_path / "log.db", "blob_dir": tmp_path / "blobs",
            "producers_file": producers,
            "targets_file": write_targets(tmp_path / "targets.yaml", {"essms-a": "http://127.0.0.1:9/fhir"}),
            "tls_certfile": pki.server.cert, "tls_keyfile": pki.server.key, "tls_client_ca_file": pki.ca.path,
            "tls_crl_file": pki.crl, "tls_revoked_fingerprints": [pki.fp_revoked.fingerprint],
            "auth_reload_s": 0.2, "log_format": "console",
        }
        values.update(overrides)
        return Settings(**values)
    return build


def client(pki: Pki, cert: Client | None) -> httpx.AsyncClient:
    ctx = ssl.create_default_context(cafile=str(pki.ca.path))
    if cert is not None:
        ctx.load_cert_chain(str(cert.cert), str(cert.key))
    return httpx.AsyncClient(verify=ctx, timeout=10)


async def post(pki: Pki, url: str, cert: Client | None, token: str | None = None,
               bundle: dict[str, Any] | None = None) -> httpx.Response:
    headers = {"Content-Type": "application/fhir+json", "X-Relais-Target": "essms-a"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with client(pki, cert) as c:
        return await c.post(f"{url}/fhir", content=orjson.dumps(bundle or BUNDLE), headers=headers)


async def test_registered_client_certificate_is_accepted(pki: Pki, make: Callable[..., Settings]) -> None:
    async with serving(make()) as url:
        answer = await post(pki, url, pki.good)
        assert answer.status_code == 202, answer.text
        both = await post(pki, url, pki.both, TOKEN_BOTH)
        assert both.status_code == 202, both.text
        plain = await post(pki, url, None, TOKEN_PLAIN)  # token-only producers need no certificate
        assert plain.status_code == 202, plain.text


async def test_certificate_from_unknown_ca_is_refused_at_handshake(pki: Pki, make: Callable[..., Settings]) -> None:
    async with serving(make()) as url:
        with pytest.raises(httpx.HTTPError):  # the TLS handshake itself fails: nothing reaches the app
            answer = await post(pki, url, pki.foreign)
            # TLS 1.3 may report the alert only on the first read: then it must not be accepted.
            assert answer.status_code == 401
            raise httpx.ConnectError("refused after handshake")


async def test_expired_certificate_is_refused(pki: Pki, make: Callable[..., Settings]) -> None:
    async with serving(make()) as url:
        with pytest.raises(httpx.HTTPError):
            answer = await post(pki, url, pki.expired)
            assert answer.status_code == 401
            raise httpx.ConnectError("refused after handshake")


@pytest.mark.parametrize("which", ["crl_revoked", "fp_revoked", "unregistered"])
async def test_revoked_or_unregistered_certificate_is_refused(pki: Pki, make: Callable[..., Settings],
                                                              which: str) -> None:
    async with serving(make()) as url:
        answer = await post(pki, url, getattr(pki, which))
        assert answer.status_code == 401, answer.text
        assert answer.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize("which", ["crl_revoked", "fp_revoked"])
async def test_revoked_certificate_with_a_valid_token_is_refused_and_audited(pki: Pki, make: Callable[..., Settings],
                                                                             which: str) -> None:
    """A presented certificate is never ignored: a token-only producer's good token does not excuse it."""
    settings = make()
    ledger = Ledger(settings.database_url)
    try:
        async with serving(settings) as url:
            assert (await post(pki, url, None, TOKEN_PLAIN)).status_code == 202  # the token alone is fine
            answer = await post(pki, url, getattr(pki, which), TOKEN_PLAIN)
            assert answer.status_code == 401, answer.text
            assert "revoked" in answer.json()["issue"][0]["diagnostics"]
            audit.bind(ledger, settings)

            async def refused() -> list[audit.AuditEntry]:
                return (await audit.entries(ledger, audit.AuditFilter(kind="auth.refused")))[0]

            rows = await wait_for(refused, timeout_s=10)  # written in the background, never delaying the 401
        assert [(r.outcome, r.detail["surface"], r.detail["http_status"]) for r in rows] == [
            ("failure", "ingress", 401)]
        assert "revoked" in rows[0].detail["reason"] and rows[0].detail["path"] == "/fhir"
        assert (await auditchain.verify_chain(ledger)).valid
    finally:
        await ledger.close()


async def test_both_needs_token_and_matching_certificate(pki: Pki, make: Callable[..., Settings]) -> None:
    async with serving(make()) as url:
        assert (await post(pki, url, pki.both)).status_code == 401  # certificate without the token
        assert (await post(pki, url, None, TOKEN_BOTH)).status_code == 401  # token without the certificate
        assert (await post(pki, url, pki.good, TOKEN_BOTH)).status_code == 401  # someone else's certificate


async def test_cross_structure_submission_is_refused(pki: Pki, make: Callable[..., Settings]) -> None:
    other = make_bundle(4, seed=12)
    assert organization_finess(other) != FINESS
    async with serving(make()) as url:
        answer = await post(pki, url, pki.good, bundle=other)
        assert answer.status_code == 403
        issue = answer.json()["issue"][0]
        assert issue["code"] == "forbidden" and organization_finess(other) in issue["diagnostics"]


async def test_producers_file_and_certificates_rotate_without_restart(pki: Pki, make: Callable[..., Settings],
                                                                      tmp_path: Path) -> None:
    (tmp_path / "srv.pem").write_bytes(pki.server.cert.read_bytes())
    (tmp_path / "srv.key").write_bytes(pki.server.key.read_bytes())
    settings = make(tls_certfile=tmp_path / "srv.pem", tls_keyfile=tmp_path / "srv.key")
    async with serving(settings) as url:
        assert (await post(pki, url, pki.unregistered)).status_code == 401
        assert settings.producers_file is not None
        settings.producers_file.write_text(producers_yaml(pki, good_fingerprint=pki.unregistered.fingerprint))
        future = time.time() + 5
        os.utime(settings.producers_file, (future, future))
        deadline = time.monotonic() + 10
        while (await post(pki, url, pki.unregistered)).status_code != 202:
            assert time.monotonic() < deadline, "the producers file was not reloaded"
            await asyncio.sleep(0.2)
        assert (await post(pki, url, pki.good)).status_code == 401  # the old certificate is no longer registered

        # Server certificate rotation: new connections get the new certificate, no restart.
        fresh = pki.ca.issue(tmp_path, "server-2", server=True)
        assert settings.tls_certfile is not None and settings.tls_keyfile is not None
        settings.tls_certfile.write_bytes(fresh.cert.read_bytes())
        settings.tls_keyfile.write_bytes(fresh.key.read_bytes())
        os.utime(settings.tls_certfile, (future, future))
        deadline = time.monotonic() + 10
        while True:
            served = await asyncio.to_thread(_served_certificate_sha256, settings.http_port, pki)
            if served == fresh.fingerprint:
                break
            assert time.monotonic() < deadline, "the server certificate was not reloaded"
            await asyncio.sleep(0.3)


def _served_certificate_sha256(port: int, pki: Pki) -> str:
    import socket

    ctx = ssl.create_default_context(cafile=str(pki.ca.path))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return hashlib.sha256(der).hexdigest()


async def test_a_forbidden_finess_is_refused_and_audited(pki: Pki, make: Callable[..., Settings]) -> None:
    """403 (an authenticated producer sending for an ESSMS it may not speak for) is in the trail too."""
    other = make_bundle(4, seed=12)
    assert organization_finess(other) != FINESS
    settings = make()
    ledger = Ledger(settings.database_url)
    try:
        async with serving(settings) as url:
            answer = await post(pki, url, pki.good, bundle=other)
            assert answer.status_code == 403, answer.text
            audit.bind(ledger, settings)

            async def refused() -> list[audit.AuditEntry]:
                return (await audit.entries(ledger, audit.AuditFilter(kind="auth.refused")))[0]

            rows = await wait_for(refused, timeout_s=10)
        assert [(r.detail["surface"], r.detail["http_status"]) for r in rows] == [("ingress", 403)]
        assert (await auditchain.verify_chain(ledger)).valid
    finally:
        await ledger.close()
