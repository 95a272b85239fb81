"""The subject key: which person a Bundle is about, as an opaque hash fit for Kafka keys and headers.

Deliveries are keyed by target and person so one person's exports reach a target in order. The
person's identifier (often the INS) is personal data, so only a truncated SHA-256 of it leaves the
validator.
"""

from __future__ import annotations

import hashlib
from typing import Any


def subject_key(bundle: dict[str, Any]) -> str | None:
    """A stable 16-hex-digit key for the Bundle's first Patient, or None when it has no identified one."""
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or resource.get("resourceType") != "Patient":
            continue
        identifiers = [i for i in resource.get("identifier") or [] if isinstance(i, dict) and i.get("value")]
        if identifiers:
            first = min(identifiers, key=lambda i: (str(i.get("system", "")), str(i["value"])))
            raw = f"{first.get('system', '')}|{first['value']}"
        elif isinstance(entry.get("fullUrl"), str):
            raw = entry["fullUrl"]
        else:
            continue
        return hashlib.sha256(raw.encode()).hexdigest()[:16]
    return None
