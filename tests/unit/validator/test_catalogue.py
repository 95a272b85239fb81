"""Every profile of the rule files: a full and a minimal valid instance, and each rule kind broken."""

from __future__ import annotations

from typing import Any

import pytest

from services.validator.checks import Extension, Slice, SliceGroup
from services.validator.logic import validate_bundle
from tests.fixtures.tddui_cases import Broken, broken_cases, full_bundle, minimal_bundle, profile, profile_ids

PROFILES = profile_ids()
CASES = [case for pid in PROFILES for case in broken_cases(pid)]


@pytest.mark.parametrize("pid", PROFILES)
def test_full_instance_is_valid(pid: str) -> None:
    bundle, _ = full_bundle(pid)
    assert validate_bundle(bundle) == []


# What each profile requires at the top level (TDDUI + FR Core + base FHIR R4), as the minimal
# instances show it; checked by eye against docs/tddui-profiles.md §6. Sorted keys, `_x` = the
# extensions of primitive x (tddui-patient: birthDate.extension:birthOrder).
MINIMAL_ELEMENTS: dict[str, set[str]] = {
    "tddui-basic-decision": {"code", "extension", "identifier"},
    "tddui-careplan-projet-personnalise": {"identifier", "intent", "status", "subject", "supportingInfo", "title"},
    "tddui-consent-accord": {"category", "dateTime", "performer", "policy", "scope", "status"},  # policy: ppc-1 (R4)
    "tddui-document-reference": {"author", "content", "status"},
    "tddui-encounter-evenement": {"class", "identifier", "period", "status", "subject"},
    "tddui-encounter-sejour": {"class", "identifier", "serviceProvider", "status", "subject"},
    "tddui-goal-attente": {"description", "extension", "identifier", "lifecycleStatus", "note", "subject"},
    "tddui-goal-objectif": {"description", "extension", "identifier", "lifecycleStatus", "note", "subject"},
    "tddui-goal-projet-vie": {"description", "identifier", "lifecycleStatus", "subject"},
    "tddui-observation-cause-mortalite": {"code", "component", "status", "subject"},
    "tddui-observation-mobilite-usager": {"code", "status", "subject"},
    "tddui-observation-periode-scolaire": {"code", "identifier", "performer", "status", "subject"},
    "tddui-observation-repas": {"category", "code", "effectiveDateTime", "extension", "identifier", "status",
                                "subject"},
    "tddui-organization": {"identifier"},
    "tddui-patient": {"_birthDate", "name"},  # the birth-order extension alone makes birthDate present
    "tddui-patient-ins": {"birthDate", "extension", "gender", "identifier", "name"},
    "tddui-practitioner": {"identifier"},
    "tddui-practitioner-role": set(),
    "tddui-questionnaire-response": {"identifier", "item", "questionnaire", "status", "subject"},
    "tddui-related-person-contact": {"patient"},
    "tddui-schedule": {"actor"},
    "tddui-service-request-besoin": {"basedOn", "code", "identifier", "intent", "status", "subject"},
    "tddui-service-request-demande-orientation": {"identifier", "intent", "status", "subject"},
    "tddui-slot-presence-absence": {"end", "identifier", "schedule", "serviceType", "start", "status"},
    "tddui-task-action": {"basedOn", "identifier", "input", "intent", "status"},
    "tddui-task-bilan": {"basedOn", "executionPeriod", "identifier", "intent", "status"},
    "tddui-task-moyen-ressource": {"basedOn", "identifier", "input", "intent", "status"},
    "tddui-task-prestation": {"basedOn", "identifier", "input", "intent", "status"},
    "tddui-task-transport-professionnel": {"encounter", "executionPeriod", "for", "identifier", "intent", "status"},
    "tddui-task-transport-usager": {"encounter", "executionPeriod", "identifier", "intent", "status"},
}


@pytest.mark.parametrize("pid", PROFILES)
def test_minimal_instance_is_valid(pid: str) -> None:
    bundle, _ = minimal_bundle(pid)
    assert validate_bundle(bundle) == []


@pytest.mark.parametrize("pid", PROFILES)
def test_minimal_instance_holds_exactly_what_the_profile_requires(pid: str) -> None:
    bundle, i = minimal_bundle(pid)
    resource = bundle["entry"][i]["resource"]
    assert set(resource) - {"resourceType", "meta"} == MINIMAL_ELEMENTS[pid]
    for key in MINIMAL_ELEMENTS[pid]:  # each one is needed: without it, the entry has an error
        smaller, _ = minimal_bundle(pid)
        del smaller["entry"][i]["resource"][key]
        assert any(x.is_error for x in validate_bundle(smaller)), key


@pytest.mark.parametrize("case", CASES, ids=str)
def test_broken_instance_fails_with_rule_and_expression(case: Broken) -> None:
    bundle, _ = full_bundle(case.profile)
    case.mutate(bundle)
    issues = validate_bundle(bundle)
    found = [(i.rule, i.expression[0] if i.expression else None) for i in issues]
    assert (case.fires or case.rule, case.expression) in found, found


# Rule kinds a profile has that no generated case breaks, e.g. because the factory's full instance
# does not carry the element (an optional element, or a slice of unbounded size): empty, and to stay
# so. A rule kind added to a profile needs the element in the full instance (tests/fixtures/tddui.py)
# or, when no valid instance can carry it, an entry in tddui_cases._ADDED. `inv` is covered for every
# invariant by test_invariants.py.
KNOWN_GAPS: dict[str, set[str]] = {}


def _kinds(checks: Any) -> set[str]:
    out: set[str] = set()
    for check in checks:
        if isinstance(check, SliceGroup):
            out |= _kinds(check.slices)
            continue
        if isinstance(check, Extension):
            out.add("ext")
            continue
        kind = check.rule.split("/")[1]
        if isinstance(check, Slice) and check.min == 0:
            if check.max is not None:
                out.add("slice-max")
        else:
            out.add(kind)
        out |= _kinds(getattr(check, "sub", ()))
    return out - {"inv"}


@pytest.mark.parametrize("pid", PROFILES)
def test_every_rule_kind_of_the_profile_has_a_broken_instance(pid: str) -> None:
    have = _kinds(profile(pid).checks)
    covered = {case.kind for case in broken_cases(pid)}
    assert have - covered == KNOWN_GAPS.get(pid, set())


def test_the_catalogue_is_large() -> None:
    assert len(CASES) >= 400
    assert {c.kind for c in CASES} >= {"card", "pattern", "binding", "targets", "type", "slice", "slice-max", "ext"}
