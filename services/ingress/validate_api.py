"""`POST /fhir/Bundle/$validate`: the validator's verdict on a Bundle, at once, and no transfer created.

For DUI vendors testing their exports. FHIR `$validate` semantics: the answer is 200 with an
OperationOutcome whether or not the Bundle is valid (its issues say so); 4xx only when there is no
resource to validate (not JSON, not a Bundle). The body is a Bundle, or a `Parameters` resource
whose `resource` parameter holds it. Authenticated like `POST /fhir`; diagnostics in French when
`Accept-Language` prefers it. The operator's RELAIS_VALIDATION_* options apply, so the vendor sees
the decision the broker would take. Kafka is not needed.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from services.core.outcome import Issue
from services.http.responses import outcome_response
from services.ingress import checks, limits, security
from services.ingress.checks import Refusal
from services.ingress.state import ingress_state
from services.validator.logic import validate_bundle
from services.validator.options import ValidationOptions, validation_options

router = APIRouter(tags=["validation"])

RULE_INPUT = "relais-validate-input"


@router.post("/fhir/Bundle/$validate", summary="Validate a TDDUI Bundle against the profiles (no transfer)",
             responses={200: {"description": "OperationOutcome: the findings (valid or not)"}})
async def validate(request: Request) -> Response:
    """Validate the Bundle in the body (or in a Parameters `resource`) and answer its OperationOutcome."""
    state = ingress_state(request)
    settings = state.settings
    try:
        producer = security.caller(state, request).producer  # exactly as POST /fhir
        # Validation costs CPU: the producer's rate and concurrency limits apply as to POST /fhir.
        async with state.limiter.slot(producer.id):
            for refusal in (checks.check_content_type(request.headers.get("Content-Type")),
                            checks.check_declared_length(request.headers.get("Content-Length"),
                                                         settings.max_body_bytes)):
                if refusal:
                    raise refusal
            body = await limits.read_body(request, settings.max_body_bytes, settings.body_read_timeout_s)
            options = validation_options(settings, request.headers.get("Accept-Language"))
            # CPU-bound, parsing included (the duplicate-key walk reads every object; milliseconds for a typical
            # Bundle, seconds for a large one): in a worker thread, so the loop answering POST /fhir never waits.
            issues = await run_in_threadpool(_validate_body, body, options)
    except Refusal as refusal:
        return outcome_response(refusal.status, refusal.issues, dict(refusal.headers))
    return outcome_response(200, issues, {"Content-Language": options.language})


def _validate_body(body: bytes, options: ValidationOptions) -> list[Issue]:
    """The findings on the Bundle in `body` (raises a Refusal when there is no Bundle to validate)."""
    return validate_bundle(_bundle_of(_decode(body)), options)


def _decode(body: bytes) -> dict[str, Any]:
    if not body:
        raise checks.refuse(400, "structure", "the request has no body; send a FHIR Bundle (or Parameters with a "
                            "'resource' parameter holding it)", rule=RULE_INPUT)
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise checks.refuse(400, "structure", f"the body is not valid JSON ({exc}); send a FHIR Bundle as JSON",
                            rule=RULE_INPUT) from None
    if not isinstance(data, dict):
        raise checks.refuse(400, "structure", "the body is JSON but not an object; send a FHIR Bundle",
                            rule=RULE_INPUT)
    duplicate = checks.duplicate_key(body, data)
    if duplicate is not None:  # as POST /fhir refuses it: the vendor learns it here first
        raise checks.refuse(400, "structure", f"the JSON repeats the key {duplicate.rsplit('.', 1)[-1]!r} in one "
                            "object; each key may appear once", duplicate, rule="relais-ingress-duplicate-key")
    return data


def _bundle_of(data: dict[str, Any]) -> dict[str, Any]:
    """The Bundle to validate: the body itself, or the `resource` parameter of a Parameters body."""
    rtype = data.get("resourceType")
    if rtype == "Parameters":
        params = data.get("parameter")
        found = [p.get("resource") for p in params if isinstance(p, dict) and p.get("name") == "resource"] \
            if isinstance(params, list) else []
        if len(found) != 1 or not isinstance(found[0], dict):
            raise checks.refuse(400, "required", "Parameters must hold exactly one 'resource' parameter whose "
                                "'resource' is the Bundle to validate", "Parameters.parameter", rule=RULE_INPUT)
        data, rtype = found[0], found[0].get("resourceType")
    if rtype != "Bundle":
        raise checks.refuse(400, "structure", f"resourceType is {rtype!r}, not 'Bundle'; Bundle/$validate takes "
                            "a TDDUI transaction Bundle", "Bundle.resourceType" if rtype is not None else "Bundle",
                            rule=RULE_INPUT)
    return data
