"""The Python twins of FHIRPath invariants agree with fhirpathpy; compiled patterns agree with `matches`."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.validator import predicates
from services.validator.invariants import holds
from services.validator.paths import matches, pattern_matcher
from services.validator.predicates import FR_CORE_RELIABILITY, NIA, NIR, NIR_DEMO, NIR_TEST, QR_PARTICIPANT, twin
from tests.unit.validator.test_invariants import SAMPLES, all_invariants

TWINNED = sorted(rule for rule, inv in all_invariants().items() if inv.twin is not None)
EXPRESSIONS = {inv.rule: inv for inv in all_invariants().values()}


def fhirpath(rule: str, node: Any) -> bool | str:
    return holds(EXPRESSIONS[rule].function, node)


def test_the_invariants_every_bundle_meets_have_twins() -> None:
    assert set(TWINNED) == {
        "tddui-patient-ins/inv/fr-core-1", "tddui-patient-ins/inv/fr-core-2",
        "tddui-questionnaire-response/inv/auto-eval-porteur",
        "tddui-questionnaire-response/inv/professionnel-requis",
        "tddui-goal-projet-vie/inv/GoalProjetVieIdentifierFormat",
        "tddui-observation-repas/inv/ObservationRepasIdentifierFormat",
        "tddui-service-request-besoin/inv/ServiceRequestBesoinIdentifierFormat",
        "tddui-slot-presence-absence/inv/SlotPresenceAbsenceIdentifierFormat",
    }


def test_every_hand_written_twin_is_for_an_expression_of_the_rule_files() -> None:
    """An edited expression retires its twin; a twin for no expression is a stale translation."""
    assert predicates.twinned() <= _expressions()


def _expressions() -> set[str]:
    from services.validator.ruleset import _documents

    found: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expression"), str) and "key" in node:
                found.add(node["expression"])
            for v in node.values():
                visit(v)
        elif isinstance(node, list):
            for v in node:
                visit(v)

    visit(_documents())
    return found


def test_unknown_expressions_have_no_twin() -> None:
    assert twin("value.matches('a\\\\d')") is None  # escapes: not the simple form, fhirpathpy decides
    assert twin("identifier.exists()") is None


@pytest.mark.parametrize("rule", TWINNED)
def test_twin_agrees_with_fhirpathpy_on_the_samples(rule: str) -> None:
    inv = EXPRESSIONS[rule]
    bad, good = SAMPLES[rule]
    assert inv.twin is not None
    assert inv.twin(bad) is False and fhirpath(rule, bad) is False
    assert inv.twin(good) is True and fhirpath(rule, good) is True


# --- generated content: well-formed, odd and hostile shapes built from the words the twins read ------

WORDS = st.sampled_from([
    "VALI", "PROV", "official", "usual", "temp", NIR, NIA, NIR_TEST, NIR_DEMO, "urn:x", FR_CORE_RELIABILITY,
    "identityStatus", QR_PARTICIPANT, "TDDUIHolder", "TDDUIResponsible", "Patient/1", "Practitioner/2",
    "RelatedPerson/3", "urn:uuid:1", "", "3999999999/AB-PDV-1", "3999999999/AB-REPAS-1", "3999999999/AB-BESO-1",
    "3999999999/AB-PA-1", "3999999999/AB-PA-1\n", "399/AB-PA-1", "3999999999/A_B-PDV-1",
])
KEYS = st.sampled_from([
    "extension", "url", "valueCoding", "valueCode", "valueString", "valueCodeableConcept", "value", "code",
    "identifier", "system", "use", "source", "reference", "author", "_use", "_value", "_system", "_reference",
])
SCALARS = st.one_of(WORDS, st.none(), st.booleans(), st.integers(-2, 2), st.floats(allow_nan=False, width=16))
JSONISH = st.recursive(SCALARS, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                       st.dictionaries(KEYS, kids, max_size=4)), max_leaves=14)


def _identifier() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional={"system": WORDS, "use": WORDS, "value": WORDS, "_use": JSONISH})


def _reliability() -> st.SearchStrategy[dict[str, Any]]:
    status = st.fixed_dictionaries({"url": st.sampled_from(["identityStatus", "validationMode"])}, optional={
        "valueCoding": st.fixed_dictionaries({}, optional={"code": WORDS, "system": WORDS}),
        "valueCode": WORDS, "value": JSONISH})
    return st.fixed_dictionaries({"url": st.sampled_from([FR_CORE_RELIABILITY, "urn:other"])},
                                 optional={"extension": st.lists(status, max_size=2)})


PATIENTS = st.fixed_dictionaries({"resourceType": st.just("Patient")}, optional={
    "extension": st.lists(st.one_of(_reliability(), JSONISH), max_size=2),
    "identifier": st.one_of(st.lists(st.one_of(_identifier(), JSONISH), max_size=4), JSONISH),
})
_PARTICIPANT = st.fixed_dictionaries({"url": st.sampled_from([QR_PARTICIPANT, "urn:other"])}, optional={
    "extension": st.lists(st.fixed_dictionaries({"url": WORDS}, optional={"valueString": WORDS}), max_size=3)})
RESPONSES = st.fixed_dictionaries({"resourceType": st.just("QuestionnaireResponse")}, optional={
    "source": st.one_of(st.fixed_dictionaries({}, optional={"reference": WORDS, "_reference": JSONISH}), JSONISH),
    "author": st.one_of(st.fixed_dictionaries({"reference": WORDS}), JSONISH),
    "extension": st.lists(st.one_of(_PARTICIPANT, JSONISH), max_size=2),
})
IDENTIFIERS = st.one_of(_identifier(), st.dictionaries(KEYS, JSONISH, max_size=3))
CONTENT = {"tddui-patient-ins": PATIENTS, "tddui-questionnaire-response": RESPONSES}


def _agrees(rule: str, node: Any) -> None:
    fast = EXPRESSIONS[rule].twin(node)  # type: ignore[misc]
    slow = fhirpath(rule, node)
    if fast is None:
        return  # deferred: fhirpathpy decides, by construction the same answer
    assert fast is slow, (node, fast, slow)


@pytest.mark.parametrize("rule", TWINNED)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_twin_agrees_with_fhirpathpy_on_generated_content(rule: str, data: st.DataObject) -> None:
    strategy = CONTENT.get(rule.split("/")[0], IDENTIFIERS)
    _agrees(rule, data.draw(strategy))


@pytest.mark.parametrize("rule", TWINNED)
@settings(max_examples=40, deadline=None)
@given(node=JSONISH)
def test_twin_agrees_or_defers_on_any_json(rule: str, node: Any) -> None:
    _agrees(rule, node)


def test_twins_answer_for_plain_content_and_defer_for_odd_shapes() -> None:
    rule = "tddui-patient-ins/inv/fr-core-1"
    fn = EXPRESSIONS[rule].twin
    assert fn is not None
    assert fn({"identifier": [{"system": NIR, "use": "official"}]}) is True
    assert fn({"identifier": {"system": NIR}}) is None  # one object where FHIR has a list: FHIRPath semantics
    assert fn({"identifier": [{"use": "official", "_use": {"id": "x"}}]}) is None
    assert fn("not an object") is None


# --- compiled patterns --------------------------------------------------------------------------------

PATTERNS = st.recursive(
    st.one_of(st.sampled_from(["a", "b", "official"]), st.integers(0, 2), st.booleans()),
    lambda kids: st.one_of(st.lists(kids, min_size=1, max_size=3),
                           st.dictionaries(st.sampled_from(["system", "code", "coding", "type", "use"]), kids,
                                           min_size=1, max_size=3)),
    max_leaves=8,
)
VALUES = st.recursive(
    st.one_of(st.none(), st.sampled_from(["a", "b", "official"]), st.integers(0, 2), st.booleans()),
    lambda kids: st.one_of(st.lists(kids, max_size=3),
                           st.dictionaries(st.sampled_from(["system", "code", "coding", "type", "use"]), kids,
                                           max_size=4)),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(pattern=PATTERNS, value=VALUES)
def test_pattern_matcher_agrees_with_matches(pattern: Any, value: Any) -> None:
    assert pattern_matcher(pattern)(value) is matches(value, pattern)


@settings(max_examples=200, deadline=None)
@given(pattern=PATTERNS)
def test_pattern_matcher_accepts_the_pattern_itself(pattern: Any) -> None:
    assert pattern_matcher(pattern)(pattern) is True
