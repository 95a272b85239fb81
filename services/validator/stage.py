"""Validator stage: `transfers.received` → `transfers.validated` or `transfers.rejected`."""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from services.core.envelope import JSON, Emit, Record, event
from services.core.identifiers import identifier_digests
from services.core.metrics import BUNDLES_REJECTED
from services.core.outcome import operation_outcome
from services.core.topics import RECEIVED, REJECTED, VALIDATED
from services.validator.logic import validate_bundle
from services.validator.options import ValidationOptions
from services.validator.subject import subject_key


class ValidatorStage:
    """Checks each Bundle against the TDDUI rules; errors reject it, warnings travel with it."""

    name = "validator"
    topics: Sequence[str] = (RECEIVED,)

    def __init__(self, options: ValidationOptions | None = None) -> None:
        self.options = options or ValidationOptions()

    async def handle(self, record: Record) -> Sequence[Emit]:
        """Validate one received Bundle and say so on `transfers.events`."""
        env = record.envelope
        try:
            parsed = orjson.loads(env.data)
        except orjson.JSONDecodeError:
            parsed = None
        # Parsed once here for both the engine and the subject key; the engine reports bad JSON itself.
        bundle = parsed if isinstance(parsed, dict) else None
        issues = validate_bundle(bundle if bundle is not None else env.data, self.options)
        outcome = operation_outcome(issues)
        errors = sum(i.is_error for i in issues)
        if errors:
            BUNDLES_REJECTED.labels(env.producer or "").inc()
            rejected = env.evolve(type="fr.relais.transfer.rejected", source="/relais/validator",
                                  data=orjson.dumps(outcome), content_type=JSON)
            return [
                Emit(REJECTED, record.key, rejected),
                event(env, "rejected", self.name, {"errors": errors, "outcome": outcome,
                                                   "identifiers": identifier_digests(bundle)}),
            ]
        subject = subject_key(bundle) if bundle is not None else None
        extra = {**env.extra, "warnings": str(len(issues))}
        if subject:
            extra["subject"] = subject
        validated = env.evolve(type="fr.relais.transfer.validated", source="/relais/validator", extra=extra)
        detail: dict[str, object] = {"warnings": len(issues), "identifiers": identifier_digests(bundle)}
        if issues:
            detail["outcome"] = outcome
        return [Emit(VALIDATED, record.key, validated), event(env, "validated", self.name, detail)]
