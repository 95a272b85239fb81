"""Reading Relais's YAML configuration files (targets, producers, operators): one way, one kind of error."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from services.core.errors import ConfigurationError

Model = TypeVar("Model", bound=BaseModel)


def load_yaml_model(path: Path, model: type[Model], what: str) -> Model:
    """The file parsed into `model`; a ConfigurationError naming the file and each bad entry otherwise."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        return model.model_validate(raw)
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigurationError(f"cannot read {what} file {path}: {exc}") from exc
    except ValidationError as exc:
        details = "\n".join(f"  - {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False))
        raise ConfigurationError(f"{what} file {path} is invalid:\n{details}") from exc


def repeated(values: Iterable[str]) -> list[str]:
    """The values that occur more than once, sorted (for "must be unique" checks)."""
    seen: set[str] = set()
    twice: set[str] = set()
    for value in values:
        (twice if value in seen else seen).add(value)
    return sorted(twice)


def file_stamp(path: Path | None) -> int | None:
    """The file's modification time in nanoseconds, compared to see that it changed and must be re-read;
    None when there is no such file (not configured, or gone: the reloaders then keep what they have)."""
    if path is None:
        return None
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def sha256_fingerprint(text: str) -> str:
    """A certificate's SHA-256 fingerprint as configured (any case, ':' between bytes as openssl prints it) in the
    one form Relais compares: 64 lower-case hex digits. Anything else is refused: it could never match a certificate."""
    fingerprint = text.strip().replace(":", "").lower()
    if len(fingerprint) != 64 or any(c not in "0123456789abcdef" for c in fingerprint):
        raise ValueError(f"{text.strip()!r} is not a SHA-256 fingerprint: 64 hex digits, ':' allowed between bytes "
                         "(openssl x509 -noout -fingerprint -sha256 -in CERT.pem)")
    return fingerprint
