"""The target directory: which FHIR endpoints Relais delivers to (RELAIS_TARGETS_FILE, YAML).

```yaml
targets:
  - id: essms-les-tilleuls           # what producers name in X-Relais-Target
    base_url: https://fhir.example/fhir   # the target's FHIR base; transactions are POSTed here
    finess: "750000001"               # optional
    headers: {X-Tenant: tilleuls}     # optional extra headers
    bearer_token_env: TILLEULS_TOKEN  # optional: send "Authorization: Bearer $TILLEULS_TOKEN"
```
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from services.core.errors import ConfigurationError


class Target(BaseModel):
    """One system Relais delivers to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    base_url: str
    finess: str | None = Field(default=None, pattern=r"^\d{9}$")
    headers: dict[str, str] = Field(default_factory=dict)
    bearer_token_env: str | None = None
    enabled: bool = True

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        return v.rstrip("/")


class TargetDirectory(BaseModel):
    """Every configured target, by id."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    targets: list[Target] = Field(default_factory=list)

    @field_validator("targets")
    @classmethod
    def _unique_ids(cls, v: list[Target]) -> list[Target]:
        ids = [t.id for t in v]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"target ids must be unique; repeated: {', '.join(duplicates)}")
        return v

    def get(self, target_id: str) -> Target | None:
        """The target with this id, if configured."""
        return next((t for t in self.targets if t.id == target_id), None)

    def ids(self) -> set[str]:
        """Every configured target id."""
        return {t.id for t in self.targets}


def load_targets(path: Path | None) -> TargetDirectory:
    """Read and check the targets file; no file means no targets (every transfer will be refused)."""
    if path is None:
        return TargetDirectory()
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        return TargetDirectory.model_validate(raw)
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigurationError(f"cannot read targets file {path}: {exc}") from exc
    except ValidationError as exc:
        raise ConfigurationError(f"targets file {path} is invalid:\n{_explain(exc)}") from exc


def _explain(exc: ValidationError) -> str:
    return "\n".join(
        f"  - {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False)
    )
