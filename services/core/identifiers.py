"""Business identifiers as search keys: a transfer is found by its Bundle's or any resource's identifier value.

Identifiers (an INS, an Encounter number) are personal data: the ledger keeps only a keyed-free SHA-256
of each value (`digest`), never the value, and an operator's search hashes what they typed. Pure.
"""

from __future__ import annotations

import hashlib
from typing import Any

from services.core.bundle import entry_resources

MAX_IDENTIFIERS = 500  # per transfer: enough for any real export, bounded for a hostile one


def digest(value: str) -> str:
    """The search key of one identifier value (whatever its system)."""
    return hashlib.sha256(f"relais-identifier/1|{value.strip()}".encode()).hexdigest()


def _values(identifiers: Any) -> list[str]:
    if isinstance(identifiers, dict):
        identifiers = [identifiers]
    if not isinstance(identifiers, list):
        return []
    return [i["value"].strip() for i in identifiers
            if isinstance(i, dict) and isinstance(i.get("value"), str) and i["value"].strip()]


def identifier_digests(bundle: Any) -> list[str]:
    """The search keys of a Bundle: its own identifier and every entry resource's identifiers, deduplicated."""
    if not isinstance(bundle, dict):
        return []
    values = _values(bundle.get("identifier"))
    for _, resource in entry_resources(bundle):
        values += _values(resource.get("identifier"))
    return list(dict.fromkeys(digest(v) for v in values))[:MAX_IDENTIFIERS]
