"""Mutual TLS at the ingress: serve HTTPS, ask for a client certificate, tell the app who presented what.

The TLS layer (uvicorn's SSL context, `CERT_OPTIONAL`) refuses a handshake whose client certificate
does not chain to `RELAIS_TLS_CLIENT_CA_FILE` or is outside its validity period. A client without a
certificate still connects (producers with `auth: token` need none). The app then checks the
certificate again against the *current* files — CA, CRL (`RELAIS_TLS_CRL_FILE`), revoked fingerprints —
and maps it to a producer by fingerprint or subject (services.ingress.security).

Rotation without restart: the server certificate, the CA and the CRL are re-read when their files
change (checked at most every `RELAIS_AUTH_RELOAD_S`); new connections use the new files.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from uvicorn.protocols.http.h11_impl import H11Protocol

from services.core.configfile import file_stamp
from services.core.errors import ConfigurationError
from services.core.logging import get_logger
from services.core.settings import Settings

log = get_logger(__name__)

# Key of the peer certificate (DER bytes, or None) in each request's `request.state`.
PEER_CERT = "relais_tls_peer_cert"


class PeerCertH11Protocol(H11Protocol):
    """uvicorn's h11 protocol that hands the TLS client certificate to every request of the connection.

    uvicorn copies `app_state` into each request's `scope["state"]`; a per-connection copy carrying the
    certificate is the one place the transport (and so the TLS session) meets the ASGI scope.
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Read the peer certificate once the handshake is done (asyncio calls this after it)."""
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        self.app_state = {**self.app_state, PEER_CERT: der}


@dataclass(frozen=True, slots=True)
class ClientCertificate:
    """What Relais looks at in a client certificate."""

    fingerprint_sha256: str
    subject: str
    serial: int
    not_before: datetime
    not_after: datetime
    cert: x509.Certificate


def parse_certificate(der: bytes) -> ClientCertificate:
    """The certificate's fingerprint (SHA-256 of the DER), RFC 4514 subject, serial and validity."""
    cert = x509.load_der_x509_certificate(der)
    return ClientCertificate(hashlib.sha256(der).hexdigest(), cert.subject.rfc4514_string(), cert.serial_number,
                             cert.not_valid_before_utc, cert.not_valid_after_utc, cert)


def _load_cas(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot read client CA file {path}: {exc}") from exc


def _load_crl(path: Path) -> x509.CertificateRevocationList:
    try:
        data = Path(path).read_bytes()
        return (x509.load_pem_x509_crl(data) if b"-----BEGIN" in data else x509.load_der_x509_crl(data))
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot read CRL file {path}: {exc}") from exc


class ClientCertPolicy:
    """Checks a presented client certificate against the current CA, CRL and revoked fingerprints."""

    def __init__(self, settings: Settings) -> None:
        self.ca_path = settings.tls_client_ca_file
        self.crl_path = settings.tls_crl_file
        self.revoked = frozenset(settings.tls_revoked_fingerprints)
        self.reload_s = settings.auth_reload_s
        self._stamps: tuple[int | None, int | None] = (None, None)
        self._next_check = 0.0
        self.cas: list[x509.Certificate] = []
        self.crl: x509.CertificateRevocationList | None = None
        self.refresh(force=True)

    @property
    def enabled(self) -> bool:
        """True when a client CA is configured (mutual TLS is on)."""
        return self.ca_path is not None

    def refresh(self, *, force: bool = False) -> None:
        """Re-read the CA and CRL files when they changed; keeps the previous ones if a new file is bad."""
        if not force and time.monotonic() < self._next_check:
            return
        self._next_check = time.monotonic() + self.reload_s
        stamps = (file_stamp(self.ca_path), file_stamp(self.crl_path))
        if stamps == self._stamps and not force:
            return
        try:
            cas = _load_cas(self.ca_path) if self.ca_path else []
            crl = _load_crl(self.crl_path) if self.crl_path else None
        except ConfigurationError as exc:
            if force and not self._stamps[0]:
                raise
            log.error("client CA or CRL file changed but cannot be read; keeping the previous ones", error=str(exc))
            return
        self.cas, self.crl, self._stamps = cas, crl, stamps

    def refusal(self, cert: ClientCertificate, now: datetime | None = None) -> str | None:
        """Why this certificate is refused, or None when it is acceptable."""
        self.refresh()
        moment = now or datetime.now(UTC)
        if not (cert.not_before <= moment <= cert.not_after):
            return "the client certificate is expired or not yet valid"
        if cert.fingerprint_sha256 in self.revoked:
            return "the client certificate is revoked (RELAIS_TLS_REVOKED_FINGERPRINTS)"
        issuer = next((ca for ca in self.cas if _issued_by(cert.cert, ca)), None)
        if issuer is None:
            return "the client certificate is not issued by the configured CA"
        if self.crl is not None and self.crl.issuer == issuer.subject \
                and self.crl.get_revoked_certificate_by_serial_number(cert.serial) is not None:
            return "the client certificate is revoked (CRL)"
        return None


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


class ServerTls:
    """The ingress's SSL context; a fresh one replaces it for new connections when a file changes."""

    def __init__(self, settings: Settings) -> None:
        assert settings.tls_certfile is not None and settings.tls_keyfile is not None
        self.settings = settings
        self.paths = [settings.tls_certfile, settings.tls_keyfile, settings.tls_client_ca_file]
        self._stamps = [file_stamp(p) for p in self.paths]
        self._next_check = time.monotonic() + settings.auth_reload_s
        self.current = self._build()
        self.context = self.current  # the one uvicorn listens with; its SNI hook swaps in `current`
        self.context.sni_callback = self._on_hello

    def _build(self) -> ssl.SSLContext:
        s = self.settings
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(str(s.tls_certfile), str(s.tls_keyfile))
            if s.tls_client_ca_file is not None:
                ctx.load_verify_locations(cafile=str(s.tls_client_ca_file))
                ctx.verify_mode = ssl.CERT_OPTIONAL  # token-only producers connect without a certificate
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(f"cannot load the ingress TLS files: {exc}") from exc
        return ctx

    def refresh(self) -> None:
        """Rebuild the context when the certificate, key or CA file changed (at most every few seconds)."""
        if time.monotonic() < self._next_check:
            return
        self._next_check = time.monotonic() + self.settings.auth_reload_s
        stamps = [file_stamp(p) for p in self.paths]
        if stamps == self._stamps:
            return
        try:
            fresh = self._build()
        except ConfigurationError as exc:
            log.error("ingress TLS files changed but cannot be loaded; keeping the previous ones", error=str(exc))
            return
        fresh.sni_callback = self._on_hello
        self.current, self._stamps = fresh, stamps
        log.info("ingress TLS files reloaded")

    def _on_hello(self, ssl_object: Any, _server_name: str | None, _ctx: ssl.SSLContext) -> None:
        # Called for every ClientHello (server_name None without SNI): switch to the newest files.
        self.refresh()
        if ssl_object.context is not self.current:
            ssl_object.context = self.current

