"""Validator decisions: is this payload a TDDUI transaction Bundle Relais can forward?

Pure: no I/O, no awaits. `validate_bundle()` returns every finding as an `Issue` with a stable rule
id, a FHIRPath expression and (for profile rules) the profile that fired; errors reject the
transfer, warnings travel with it. Three passes over the decoded Bundle:

1. base FHIR R4: the structure by the fhir.resources R4B models (`base.py`; built only when the prescreen,
   `prescreen.py`, cannot prove from their field table that they would accept), then what their lax mode
   lets through, in one typed walk: strict JSON types, the data-type invariants, closed code systems
   and contained resources (`r4.py`);
2. TDDUIBundle transaction rules, the Bundle's own R4 invariants and fullUrl rules, and intra-Bundle
   references (`bundle.py`);
3. the base R4 resource rules and TDDUI profile rules of `schemas/tddui/` (`engine.py`), compiled once
   per process.
"""

from __future__ import annotations

from typing import Any

import orjson

from services.core.outcome import Issue, error
from services.validator.base import RULE_RESOURCE_TYPE, RULE_STRUCTURE, check_structure, resource_class
from services.validator.bundle import (
    all_references,
    check_bundle_r4,
    check_portable_references,
    check_references,
    check_transaction,
    iter_references,
    reference_targets,
)
from services.validator.engine import check_profiles, profiled_entries
from services.validator.messages import json_kind, quote, say
from services.validator.options import ValidationOptions
from services.validator.r4 import check_r4
from services.validator.ruleset import ruleset

RULE_JSON = "fhir-json"
RULE_NOT_BUNDLE = "fhir-not-bundle"

__all__ = [
    "RULE_JSON",
    "RULE_NOT_BUNDLE",
    "RULE_RESOURCE_TYPE",
    "RULE_STRUCTURE",
    "ValidationOptions",
    "iter_references",
    "reference_targets",
    "resource_class",
    "validate_bundle",
]

_DEFAULT = ValidationOptions()


def validate_bundle(
    data: bytes | bytearray | memoryview | str | dict[str, Any], options: ValidationOptions | None = None
) -> list[Issue]:
    """Every issue found in a TDDUI transaction Bundle (raw JSON or already decoded); never raises."""
    options = options or _DEFAULT
    lang = options.language
    bundle, issues = _load(data, lang)
    if bundle is not None:
        strict = check_r4(bundle, lang)
        structure = _deduplicated(check_structure(bundle, lang), strict) + strict
        issues.extend(structure)
        issues.extend(check_transaction(bundle, lang))
        issues.extend(check_bundle_r4(bundle, lang))
        targets = reference_targets(bundle)
        references = all_references(bundle)
        issues.extend(check_references(bundle, targets, lang, references))
        issues.extend(check_portable_references(bundle, targets, lang, references))
        known = [(i, r) for i, r in profiled_entries(bundle)
                 if isinstance(r.get("resourceType"), str) and resource_class(r["resourceType"])]
        profile_issues = check_profiles(ruleset(), known, targets, lang)
        issues.extend(_not_under(profile_issues, structure))
    return options.apply(issues)


def _deduplicated(structure: list[Issue], strict: list[Issue]) -> list[Issue]:
    """The models' findings, minus those the strict walk reports at the same place in plainer words."""
    if not strict:
        return structure
    said = {i.expression for i in strict}
    return [i for i in structure if i.expression not in said]


def _not_under(issues: list[Issue], structure: list[Issue]) -> list[Issue]:
    """Profile findings, minus those at (or under) a place the structure check already rejected."""
    if not structure:
        return issues
    broken = tuple({i.expression[0] for i in structure if i.expression})
    out = []
    for issue in issues:
        at = issue.expression[0] if issue.expression else ""
        if any(at == b or at.startswith((b + ".", b + "[")) for b in broken):
            continue
        out.append(issue)
    return out


def _load(data: object, lang: str) -> tuple[dict[str, Any] | None, list[Issue]]:
    """The decoded Bundle, or None and the issue that says why there is none."""
    if isinstance(data, bytes | bytearray | memoryview | str):
        try:
            data = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            return None, [error("structure", say(lang, "json", detail=exc), "Bundle", rule=RULE_JSON)]
    if not isinstance(data, dict):
        return None, [error("structure", say(lang, "not-object", kind=json_kind(data, lang)), "Bundle",
                            rule=RULE_NOT_BUNDLE)]
    rtype = data.get("resourceType")
    if rtype != "Bundle":
        found = (say(lang, "found-is", value=quote(rtype)) if isinstance(rtype, str)
                 else say(lang, "found-missing"))
        return None, [error("structure", say(lang, "not-bundle", found=found), "Bundle.resourceType",
                            rule=RULE_NOT_BUNDLE)]
    return data, []
