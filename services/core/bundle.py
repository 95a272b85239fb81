"""Walking a parsed Bundle whose shape nothing has vouched for yet (the router, search keys, person keys and
delivery all read producers' JSON, possibly before or without validation): one tolerant way. Pure."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def entry_resources(bundle: Any) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """Each `Bundle.entry` with its `resource`, in order, for the entries whose resource is a JSON object;
    anything else (no Bundle, `entry` not an array, an entry without a resource) is passed over, never raised."""
    entries = bundle.get("entry") if isinstance(bundle, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict):
            yield entry, resource
