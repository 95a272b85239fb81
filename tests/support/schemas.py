"""Check real records against schemas/: the envelope JSON Schema and the AsyncAPI document."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import yaml

from services.core.embedded import _decode_headers

ROOT = Path(__file__).resolve().parents[2]


def envelope_validator() -> jsonschema.Draft202012Validator:
    schema = orjson.loads((ROOT / "schemas/envelope.schema.json").read_bytes())
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def asyncapi() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "schemas/asyncapi.yaml").read_text())


def check_embedded_log(path: Path, prefix: str = "") -> dict[str, int]:
    """Validate every record in an embedded log file; returns the record count per logical topic."""
    validator = envelope_validator()
    spec = asyncapi()
    addresses = {c["address"] for c in spec["channels"].values()}
    event_kinds = set(spec["components"]["messages"]["event"]["payload"]["properties"]["kind"]["enum"])
    counts: dict[str, int] = {}
    with sqlite3.connect(path) as db:
        for topic, headers, value in db.execute("SELECT topic, headers, value FROM records"):
            logical = topic[len(prefix):]
            channel = "deliveries.retry.{tier}" if logical.startswith("deliveries.retry.") else logical
            assert channel in addresses, f"topic {logical} is not described in schemas/asyncapi.yaml"
            decoded = {k: v.decode() for k, v in _decode_headers(headers)}
            errors = sorted(validator.iter_errors(decoded), key=str)
            assert not errors, f"{logical}: {errors[0].message} in {decoded}"
            if logical == "transfers.events":
                assert orjson.loads(value)["kind"] in event_kinds
            counts[logical] = counts.get(logical, 0) + 1
    return counts
