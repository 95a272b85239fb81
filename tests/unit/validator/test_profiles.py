"""Profile rules: one broken instance per rule kind (expected rule id and FHIRPath), options, French."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from services.core.outcome import Issue, has_errors
from services.validator.logic import ValidationOptions, validate_bundle
from services.validator.ruleset import ruleset
from tests.fixtures.tddui import SD, make_bundle

# make_bundle(29) holds one entry of every kind; index of each profile's first entry:
BUNDLE = make_bundle(29)
AT = {e["resource"]["meta"]["profile"][0].removeprefix(SD): i for i, e in reversed(list(enumerate(BUNDLE["entry"])))}


def broken(profile: str, mutate: Callable[[dict[str, Any]], None]) -> list[Issue]:
    bundle = make_bundle(29)
    mutate(bundle["entry"][AT[profile]]["resource"])
    return validate_bundle(bundle)


def at(profile: str, path: str = "") -> str:
    return f"Bundle.entry[{AT[profile]}].resource{path}"


CASES = [
    # (profile, mutation, rule, expression)
    ("tddui-encounter-sejour", lambda r: r.pop("serviceProvider"),
     "tddui-encounter-sejour/card/serviceProvider", ".serviceProvider"),
    ("tddui-encounter-sejour", lambda r: r["identifier"][0].update(system="https://x.example"),
     "tddui-encounter-sejour/pattern/identifier:idStay.system", ".identifier[0].system"),
    ("tddui-encounter-sejour", lambda r: r["identifier"][0]["type"]["coding"][0].update(code="NUMDOSS"),
     "tddui-encounter-sejour/slice/identifier:idStay", ".identifier"),
    ("tddui-encounter-sejour", lambda r: r["serviceType"]["coding"][0].update(code="99"),
     "tddui-encounter-sejour/binding/serviceType", ".serviceType.coding[0]"),
    ("tddui-encounter-evenement", lambda r: r.update(status="done"),
     "fhir-r4/Encounter/binding/status", ".status"),
    ("tddui-encounter-evenement", lambda r: r["extension"][0].update(valueBoolean=True, valueString=None),
     "tddui-event-label/type", ".extension[0].valueBoolean"),
    ("tddui-observation-cause-mortalite", lambda r: r["code"]["coding"][0].update(code="1-8"),
     "tddui-observation-cause-mortalite/pattern/code", ".code"),
    ("tddui-observation-mobilite-usager", lambda r: r.update(valueString="x", valueCodeableConcept=None),
     "tddui-observation-mobilite-usager/type/value[x]", ".valueString"),
    ("tddui-goal-projet-vie", lambda r: r["identifier"][0].update(value="3999/A_B-PDV-1"),
     "tddui-goal-projet-vie/inv/GoalProjetVieIdentifierFormat", ".identifier[0]"),
    ("tddui-task-action", lambda r: r["input"][1]["valueReference"].update(reference=BUNDLE["entry"][0]["fullUrl"]),
     "tddui-task-action/targets/input:objectif.valueReference", ".input[1].valueReference.reference"),
    ("tddui-careplan-projet-personnalise", lambda r: r["supportingInfo"].pop(0),
     "tddui-careplan-projet-personnalise/slice/supportingInfo:accordStructure", ".supportingInfo"),
    ("tddui-goal-attente", lambda r: r["note"][0]["extension"][0]["valueCodeableConcept"]["coding"][0].update(
        code="accordUsager"), "tddui-goal-attente/binding/note.extension:TDDUIDiscriminator.valueCodeableConcept",
     ".note[0].extension[0].valueCodeableConcept.coding[0]"),
    ("tddui-basic-decision", lambda r: r["extension"][0]["extension"].pop(0),
     "tddui-decision.typeDecision/card", ".extension[0].extension"),
    ("tddui-slot-presence-absence", lambda r: r["serviceType"][0]["coding"][0].update(code="2"),
     "tddui-slot-presence-absence/inv/motifAbsenceCardinality", ""),
    ("tddui-patient-ins", lambda r: r["identifier"][0].update(use="usual"),
     "tddui-patient-ins/inv/fr-core-1", ""),
]


@pytest.mark.parametrize(("profile", "mutate", "rule", "path"), CASES, ids=[c[2] for c in CASES])
def test_each_rule_kind_fails_where_expected(
    profile: str, mutate: Callable[[dict[str, Any]], None], rule: str, path: str
) -> None:
    def clean(r: dict[str, Any]) -> None:
        mutate(r)
        for key in [k for k, v in r.items() if v is None]:
            del r[key]

    issues = broken(profile, clean)
    found = [(i.rule, i.expression[0]) for i in issues]
    assert (rule, at(profile, path)) in found, found
    assert has_errors(issues)


def test_the_factory_bundle_has_every_slice_and_is_clean() -> None:
    assert set(AT) == {p.id for p in ruleset().profiles.values()} - {"tddui-patient"}
    assert validate_bundle(BUNDLE) == []
    assert validate_bundle(make_bundle(29, patient_ins=False)) == []


def test_unclaimed_entries_are_matched_to_their_slice() -> None:
    bundle = make_bundle(29)
    for e in bundle["entry"]:
        del e["resource"]["meta"]
    assert validate_bundle(bundle) == []


def test_unclaimed_entry_matching_no_slice_is_explained() -> None:
    bundle = make_bundle(29)
    goal = bundle["entry"][AT["tddui-goal-projet-vie"]]["resource"]
    del goal["meta"]
    goal["identifier"][0]["system"] = "https://x.example"
    issues = validate_bundle(bundle)
    assert ("tddui-bundle/slice-none", at("tddui-goal-projet-vie")) in [(i.rule, i.expression[0]) for i in issues]


def test_options_ignore_rules_and_raise_warnings() -> None:
    bundle = make_bundle(29, published_style=True)
    assert not has_errors(validate_bundle(bundle))
    assert has_errors(validate_bundle(bundle, ValidationOptions.of(warnings_as_errors=True)))
    ignored = ["tddui-bundle-request-url", "tddui-bundle-ref-portable"]
    assert validate_bundle(bundle, ValidationOptions.of(ignore_rules=ignored)) == []


def test_french_diagnostics() -> None:
    bundle = make_bundle(3)
    del bundle["entry"][2]["resource"]["serviceProvider"]
    (en,) = validate_bundle(bundle)
    (fr,) = validate_bundle(bundle, ValidationOptions.of(language="fr-FR,fr;q=0.9,en;q=0.5"))
    assert en.rule == fr.rule and en.expression == fr.expression
    assert "is required at least 1 time(s)" in en.diagnostics
    assert "exige serviceProvider au moins 1 fois" in fr.diagnostics


def test_profile_is_reported_on_the_issue() -> None:
    issues = broken("tddui-encounter-sejour", lambda r: r.pop("serviceProvider"))
    (issue,) = [i for i in issues if i.rule == "tddui-encounter-sejour/card/serviceProvider"]
    assert issue.profile == SD + "tddui-encounter-sejour"
    assert issue.to_fhir()["extension"][1]["valueCanonical"] == issue.profile
