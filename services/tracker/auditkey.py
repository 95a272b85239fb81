"""The audit trail's MAC key: held like the encryption keys (environment or file), never in the database.

Whoever can write to the ledger database can rewrite rows, but without this key cannot make their
HMAC-SHA-256 chain verify. Where the key comes from, first match wins:

1. `RELAIS_AUDIT_KEY`: base64 of at least 32 random bytes (`relais keys new-audit-key` prints one);
2. `RELAIS_AUDIT_KEY_FILE`: a file holding that base64 text (a mounted secret);
3. a SQLite ledger and neither set: `relais-audit.key` beside the ledger file, created on first use
   (mode 0600) with a warning — fine on a laptop; in production give every process the same key by
   (1) or (2), kept off the database host, or anyone holding both can still rewrite history.

A PostgreSQL ledger without (1) or (2) refuses to start: processes on several machines would each
invent their own key and no chain would verify.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url

from services.core.errors import ConfigurationError
from services.core.logging import get_logger
from services.core.settings import Settings

log = get_logger(__name__)

MIN_KEY_BYTES = 32
KEY_FILE_NAME = "relais-audit.key"


@dataclass(frozen=True, slots=True)
class AuditKey:
    """The secret that chains the audit rows, and a public check value that names it without revealing it."""

    secret: bytes
    origin: str

    @property
    def check(self) -> str:
        """A short fingerprint stored in the genesis row: a process with another key is told so at once."""
        return hmac.new(self.secret, b"relais-audit-key-check", hashlib.sha256).hexdigest()[:16]

    def mac(self, data: bytes) -> str:
        """HMAC-SHA-256 of `data`, hex."""
        return hmac.new(self.secret, data, hashlib.sha256).hexdigest()

    def search_key(self) -> bytes:
        """The key of the ledger's identifier search keys, derived from this one (one secret to hold, three uses)."""
        return hmac.new(self.secret, b"relais-identifier-search/1", hashlib.sha256).digest()

    def person_secret(self) -> bytes:
        """The key of the person keys that order a person's records (services/core/person.py), derived."""
        return hmac.new(self.secret, b"relais-person/2", hashlib.sha256).digest()


def new_audit_key() -> str:
    """A fresh key, base64."""
    return base64.b64encode(secrets.token_bytes(MIN_KEY_BYTES)).decode()


def parse_audit_key(text: str, origin: str) -> AuditKey:
    """The key in `text` (base64, at least 32 bytes); ConfigurationError otherwise."""
    try:
        secret = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigurationError(f"{origin}: the audit key is not base64 (make one with: relais keys "
                                 "new-audit-key)") from exc
    if len(secret) < MIN_KEY_BYTES:
        raise ConfigurationError(f"{origin}: the audit key has {len(secret)} bytes; it needs at least "
                                 f"{MIN_KEY_BYTES} (make one with: relais keys new-audit-key)")
    return AuditKey(secret, origin)


def load_audit_key(settings: Settings) -> AuditKey:
    """The audit key these settings give (see the module's docstring for the order)."""
    if settings.audit_key:
        return parse_audit_key(settings.audit_key, "RELAIS_AUDIT_KEY")
    if settings.audit_key_file is not None:
        return _read(Path(settings.audit_key_file), "RELAIS_AUDIT_KEY_FILE")
    url = make_url(settings.database_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        raise ConfigurationError("the audit trail needs a key outside the database: set RELAIS_AUDIT_KEY_FILE "
                                 "(a secret file every process mounts) or RELAIS_AUDIT_KEY; make one with "
                                 "'relais keys new-audit-key'")
    path = Path(url.database).parent / KEY_FILE_NAME
    if not path.exists():
        _create(path)
    return _read(path, str(path))


def _read(path: Path, origin: str) -> AuditKey:
    try:
        return parse_audit_key(path.read_text(encoding="utf-8"), origin)
    except OSError as exc:
        raise ConfigurationError(f"{origin}: cannot read the audit key file {path}: {exc}") from exc


def _create(path: Path) -> None:
    # Written whole under a temporary name, then linked into place: another process starting at the same
    # moment either finds no file (and links its own, losing the race harmlessly) or a complete one.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(new_audit_key() + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.link(tmp, path)
    except FileExistsError:
        return  # another process created it first: use theirs
    except OSError as exc:
        raise ConfigurationError(f"cannot create the audit key file {path}: {exc}; set RELAIS_AUDIT_KEY_FILE") \
            from exc
    finally:
        tmp.unlink(missing_ok=True)
    log.warning("audit key created beside the ledger; in production set RELAIS_AUDIT_KEY_FILE to a secret kept "
                "off the database host (whoever holds both the database and the key can rewrite the trail)",
                path=str(path))
