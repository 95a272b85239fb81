"""Responses both HTTP fronts send: FHIR JSON, OperationOutcome, plain JSON."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from fastapi.responses import Response

from services.core.envelope import FHIR_JSON, JSON
from services.core.outcome import Issue, operation_outcome


def fhir_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    """A FHIR JSON response."""
    return Response(orjson.dumps(body), status_code=status, media_type=FHIR_JSON, headers=headers)


def outcome_response(status: int, issues: Sequence[Issue], headers: dict[str, str] | None = None) -> Response:
    """An OperationOutcome response: how every refusal is said."""
    return fhir_response(status, operation_outcome(issues), headers)


def json_response(body: Any, status: int = 200) -> Response:
    """A plain JSON response (operator API, health probes)."""
    return Response(orjson.dumps(body), status_code=status, media_type=JSON)
