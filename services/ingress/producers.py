"""The producer directory (RELAIS_PRODUCERS_FILE, YAML): who may post, with which token, to which targets.

```yaml
producers:
  - id: dui-acme-ssiad-paris          # appears in logs, the ledger and audit
    token_sha256: 9f86d081884c7d65...  # hex SHA-256 of the bearer token; the token itself is never stored
    targets: [sidoba, essms-a]        # optional: the targets it may name (absent: any configured target)
```
Make a token and its hash with: `python -c "import secrets,hashlib;t=secrets.token_urlsafe(32);print(t, hashlib.sha256(t.encode()).hexdigest())"`
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from services.core.errors import ConfigurationError


class Producer(BaseModel):
    """One DUI installation allowed to post transfers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    token_sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    targets: frozenset[str] | None = None

    @field_validator("token_sha256")
    @classmethod
    def _lower(cls, v: str) -> str:
        return v.lower()

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
        ids = [p.id for p in v]
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ValueError(f"producer ids must be unique; repeated: {', '.join(repeated)}")
        hashes = [p.token_sha256 for p in v]
        shared = sorted({p.id for p in v if hashes.count(p.token_sha256) > 1})
        if shared:
            raise ValueError(f"producers {', '.join(shared)} share one token (same token_sha256); give each its own token")
        return v

    def authenticate(self, token: str) -> Producer | None:
        """The producer whose token this is, or None; compares hashes in constant time."""
        digest = hashlib.sha256(token.encode()).hexdigest()
        found = None
        for producer in self.producers:  # no early exit: the time taken says nothing about the match
            if hmac.compare_digest(producer.token_sha256, digest):
                found = producer
        return found


# When authentication is explicitly disabled (development), every request acts as this producer.
ANONYMOUS = Producer(id="anonymous", token_sha256="0" * 64)


def load_producers(path: Path) -> ProducerDirectory:
    """Read and check the producers file, with errors that name the bad entry."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        return ProducerDirectory.model_validate(raw)
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigurationError(f"cannot read producers file {path}: {exc}") from exc
    except ValidationError as exc:
        details = "\n".join(f"  - {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False))
        raise ConfigurationError(f"producers file {path} is invalid:\n{details}") from exc
