"""The producer directory (RELAIS_PRODUCERS_FILE, YAML): who may post, with which token, to which targets.

```yaml
producers:
  - id: dui-acme-ssiad-paris          # appears in logs, the ledger and audit
    token_sha256: 9f86d081884c7d65...  # hex SHA-256 of the bearer token; the token itself is never stored
    targets: [sidoba, essms-a]        # optional: the targets it may name (absent: any configured target)
    finess: ["750000001"]             # optional: the structures (ESSMS) it may send for (absent: any)
    auth: token                       # token (default) | mtls (client certificate only) | both
    cert_fingerprints_sha256: [ab12...]  # mtls/both: SHA-256 of the client certificate (DER), hex
    cert_subjects: ["CN=dui-acme,O=ACME,C=FR"]  # mtls/both: or its subject (RFC 4514), issued by the CA
```
Make a token and its hash with:
    python -c "import secrets,hashlib;t=secrets.token_urlsafe(32);print(t, hashlib.sha256(t.encode()).hexdigest())"
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from services.core.configfile import load_yaml_model, repeated, sha256_fingerprint


class Producer(BaseModel):
    """One DUI installation allowed to post transfers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    auth: Literal["token", "mtls", "both"] = "token"
    token_sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$", validate_default=True)
    targets: frozenset[str] | None = None
    finess: frozenset[str] | None = None
    cert_fingerprints_sha256: frozenset[str] = frozenset()
    cert_subjects: frozenset[str] = frozenset()

    @field_validator("token_sha256")
    @classmethod
    def _lower(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None and info.data.get("auth", "token") in ("token", "both"):
            raise ValueError("Field required (the hex SHA-256 of the producer's bearer token; "
                             "only producers with auth: mtls go without)")
        return v.lower() if v is not None else None

    @field_validator("cert_fingerprints_sha256", mode="before")
    @classmethod
    def _fingerprints(cls, v: object) -> object:
        if isinstance(v, list | tuple | set | frozenset):
            return frozenset(sha256_fingerprint(str(f)) for f in v)
        return v

    @field_validator("finess", mode="before")
    @classmethod
    def _finess(cls, v: object) -> object:
        if isinstance(v, list | tuple | set | frozenset):
            out = [str(f).strip() for f in v]
            if any(not (len(f) == 9 and f.isdigit()) for f in out):
                raise ValueError("finess entries are 9-digit FINESS numbers, quoted (e.g. \"750000001\")")
            return frozenset(out)
        return v

    @model_validator(mode="after")
    def _credentials(self) -> Producer:
        if self.auth in ("mtls", "both") and not (self.cert_fingerprints_sha256 or self.cert_subjects):
            raise ValueError(f"auth {self.auth} needs cert_fingerprints_sha256 or cert_subjects")
        return self

    def may_send_for(self, finess: str) -> bool:
        """True when this producer is registered for the structure (FINESS) `finess`."""
        return self.finess is None or finess in self.finess

    def matches_certificate(self, fingerprint_sha256: str, subject: str) -> bool:
        """True when a (CA-verified) client certificate with this fingerprint or subject is this producer's."""
        return fingerprint_sha256.lower() in self.cert_fingerprints_sha256 or subject in self.cert_subjects

    def may_send_to(self, target: str) -> bool:
        """True when this producer is allowed to name `target`."""
        return self.targets is None or target in self.targets


class ProducerDirectory(BaseModel):
    """Every registered producer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    producers: list[Producer] = Field(default_factory=list)

    @field_validator("producers")
    @classmethod
    def _unambiguous(cls, v: list[Producer]) -> list[Producer]:
        ids = repeated(p.id for p in v)
        if ids:
            raise ValueError(f"producer ids must be unique; repeated: {', '.join(ids)}")
        hashes = set(repeated(p.token_sha256 for p in v if p.token_sha256 is not None))
        shared = sorted({p.id for p in v if p.token_sha256 in hashes})
        if shared:
            raise ValueError(f"producers {', '.join(shared)} share one token (same token_sha256); "
                             "give each its own token")
        return v

    def authenticate(self, token: str) -> Producer | None:
        """The producer whose token this is, or None; compares hashes in constant time."""
        digest = hashlib.sha256(token.encode()).hexdigest()
        found = None
        for producer in self.producers:  # no early exit: the time taken says nothing about the match
            if hmac.compare_digest(producer.token_sha256 or "", digest):
                found = producer
        return found

    def by_certificate(self, fingerprint_sha256: str, subject: str) -> Producer | None:
        """The producer (auth mtls or both) a verified client certificate identifies, or None."""
        for producer in self.producers:
            if producer.auth != "token" and producer.matches_certificate(fingerprint_sha256, subject):
                return producer
        return None


# When authentication is explicitly disabled (development), every request acts as this producer.
ANONYMOUS = Producer(id="anonymous", token_sha256="0" * 64)


def load_producers(path: Path) -> ProducerDirectory:
    """Read and check the producers file, with errors that name the bad entry."""
    return load_yaml_model(path, ProducerDirectory, "producers")
