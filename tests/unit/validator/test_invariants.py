"""Every invariant of the rule files, broken on purpose: each must fire (fhirpathpy accepts some broken
FHIRPath silently, and an expression that can never be false would pass every positive test).

Samples run through the compiled `Invariant` check itself, so guards, the Python twin and fhirpathpy are
all on the path. A new invariant in a rule file fails `test_every_invariant_has_samples` until it gets
a violating and a satisfying sample here.
"""

from __future__ import annotations

from typing import Any

import pytest

from services.validator.checks import Context, ExtensionDef, Invariant, SliceGroup
from services.validator.invariants import holds
from services.validator.ruleset import ruleset

TDDUI_SD = "https://interop.esante.gouv.fr/ig/fhir/tddui/StructureDefinition/"
DECISION = TDDUI_SD + "tddui-decision"
RELIABILITY = "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-identity-reliability"
RESSOURCES_USED = TDDUI_SD + "tddui-ressources-used"
QR_PARTICIPANT = TDDUI_SD + "tddui-qr-participant"


def all_invariants() -> dict[str, Invariant]:
    """Rule id → compiled invariant, from every profile, slice and extension definition."""
    found: dict[str, Invariant] = {}

    def extension(d: ExtensionDef) -> None:
        for inv in d.invariants:
            found[inv.rule] = inv
        for _, _, sub in d.subs.values():
            extension(sub)

    def visit(checks: Any) -> None:
        for check in checks:
            if isinstance(check, Invariant):
                found[check.rule] = check
            if isinstance(check, SliceGroup):
                visit(check.slices)
            visit(getattr(check, "sub", ()))
            if hasattr(check, "defn"):
                extension(check.defn)

    rs = ruleset()
    for profile in rs.profiles.values():
        visit(profile.checks)
    for definition in rs.extensions.values():
        extension(definition)
    return found


def cc(code: str) -> dict[str, Any]:
    return {"coding": [{"system": "urn:test", "code": code}]}


def sub(url: str, **value: Any) -> dict[str, Any]:
    return {"url": url, **value}


def droit(typ: str | None = None, categorie: str | None = None, detail: list[dict[str, Any]] | None = None,
          **extra: Any) -> dict[str, Any]:
    items = []
    if categorie:
        items.append(sub("categorieDroitPrestation", valueCodeableConcept=cc(categorie)))
    if typ:
        items.append(sub("typeDroitPrestation", valueCodeableConcept=cc(typ)))
    items.append(sub("natureDroitPrestation", valueCodeableConcept=cc(extra.pop("nature", "2"))))
    if extra.pop("creton", False):
        items.append(sub("creton", valueBoolean=True))
    items.append({"url": "detailPrestation", "extension": detail or []})
    return {"url": "droitPrestation", "extension": items}


def precision(code: str) -> list[dict[str, Any]]:
    return [sub("precisionOrientation", valueCodeableConcept=cc(code))]


def decision(typ: str, *more: dict[str, Any]) -> dict[str, Any]:
    return {"url": DECISION, "extension": [sub("typeDecision", valueCodeableConcept=cc(typ)), *more]}


def basic(typ: str, nature: str | None = None, maj: bool = False) -> dict[str, Any]:
    more = [droit("1.1", nature=nature)] if nature else []
    ids = [{"type": {"coding": [{"code": "IDDECISIONMAJ"}]}, "value": "x"}] if maj else []
    return {"resourceType": "Basic", "extension": [decision(typ, *more)], "identifier": ids}


def ins_patient(*identifiers: tuple[str, str]) -> dict[str, Any]:
    status = {"url": RELIABILITY, "extension": [sub("identityStatus", valueCoding={"code": "VALI"})]}
    return {"resourceType": "Patient", "extension": [status],
            "identifier": [{"system": s, "use": u, "value": "1"} for s, u in identifiers]}


def encounter(kind: str, resource_type: str) -> dict[str, Any]:
    used = {"url": RESSOURCES_USED, "extension": [sub(kind, valueString="x"),
                                                  sub("TDDUIRessourceType", valueCodeableConcept=cc(resource_type))]}
    return {"resourceType": "Encounter", "extension": [used]}


def qr(source: str, *participants: str, author: bool = False) -> dict[str, Any]:
    node: dict[str, Any] = {"resourceType": "QuestionnaireResponse", "source": {"reference": source}}
    if participants:
        node["extension"] = [{"url": QR_PARTICIPANT, "extension": [
            sub(p, valueReference={"reference": "Practitioner/1"}) for p in participants]}]
    if author:
        node["author"] = {"reference": "Practitioner/1"}
    return node


def slot(code: str, *, appointment: bool = False, planned: bool = False) -> dict[str, Any]:
    node: dict[str, Any] = {"resourceType": "Slot", "serviceType": [cc(code)]}
    if appointment:
        node["appointmentType"] = cc("x")
    if planned:
        node["extension"] = [sub(TDDUI_SD + "tddui-planned-absence", valueBoolean=True)]
    return node


NIR, NIA = "urn:oid:1.2.250.1.213.1.4.8", "urn:oid:1.2.250.1.213.1.4.9"
DP = "tddui-decision.droitPrestation/inv/"

# rule id → (violating node, satisfying node); the node is the invariant's context.
SAMPLES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "tddui-basic-decision/inv/idDecisionMAJCardinality": (basic("5"), basic("5", maj=True)),
    "tddui-basic-decision/inv/idDecisionMAJInterdiction": (basic("1", nature="1", maj=True), basic("1", nature="1")),
    DP + "FormationCardinality": (droit("11.1"), droit("11.1", detail=[sub("formation", valueString="x")])),
    DP + "PrecisionOrientationValues13.1-13.2": (droit("13.1", detail=precision("1")), droit("13.1")),
    DP + "PrecisionOrientationValues7.8": (droit("7.8", detail=precision("9")), droit("7.8", detail=precision("1"))),
    DP + "PrecisionOrientationValues7.9": (droit("7.9", detail=precision("1")), droit("7.9", detail=precision("8"))),
    DP + "PrecisionOrientationValues8.3": (droit("8.3", detail=precision("1")), droit("8.3", detail=precision("10"))),
    DP + "PrecisionOrientationValues8.6": (droit("8.6", detail=precision("1")),
                                           droit("8.6", detail=precision("UEA"))),
    DP + "cretonCardinality": (droit("7.2", categorie="7"), droit("7.2", categorie="7", creton=True)),
    DP + "temporaliteAccueilCardinalityViaCategorieDroitPrestation": (
        droit("13.3", categorie="13"),
        droit("13.3", categorie="13", detail=[sub("temporaliteAccueil", valueCodeableConcept=cc("1"))])),
    DP + "temporaliteAccueilCardinalityViaTypeDroitPrestation": (
        droit("8.7"), droit("8.7", detail=[sub("temporaliteAccueil", valueCodeableConcept=cc("1"))])),
    "tddui-decision/inv/DateEffetClotureCardinality": (
        decision("5"), decision("5", sub("dateEffetCloture", valueDate="2025-01-01"))),
    "tddui-decision/inv/motivationLocaleRequired": (
        decision("2", sub("motivation", valueCodeableConcept=cc("9999"))),
        decision("2", sub("motivation", valueCodeableConcept=cc("9999")), sub("motivationLocale", valueString="x"))),
    "tddui-encounter-evenement/inv/MatDetailOnlyIfTypeOrg206": (
        encounter("TDDUIMaterialDetail", "ORG-207"), encounter("TDDUIMaterialDetail", "ORG-206")),
    "tddui-encounter-evenement/inv/FacilityOnlyIfTypeOrg207": (
        encounter("TDDUIFacilityResource", "ORG-206"), encounter("TDDUIFacilityResource", "ORG-207")),
    "tddui-goal-projet-vie/inv/GoalProjetVieIdentifierFormat": (
        {"value": "3999999999/AB-REPAS-1"}, {"value": "3999999999/AB-PDV-1"}),
    "tddui-observation-repas/inv/ObservationRepasIdentifierFormat": (
        {"value": "3999999999/A_B-REPAS-1"}, {"value": "3999999999/AB-REPAS-1"}),
    "tddui-service-request-besoin/inv/ServiceRequestBesoinIdentifierFormat": (
        {"value": "399999999/AB-BESO-1"}, {"value": "3999999999/AB-BESO-1"}),
    "tddui-slot-presence-absence/inv/SlotPresenceAbsenceIdentifierFormat": (
        {"value": "3999999999/AB-PA-"}, {"value": "3999999999/AB-PA-1"}),
    "tddui-patient-ins/inv/fr-core-1": (ins_patient((NIR, "usual")), ins_patient((NIR, "official"))),
    "tddui-patient-ins/inv/fr-core-2": (ins_patient((NIR, "official"), ("urn:x", "official")),
                                        ins_patient((NIR, "official"), ("urn:x", "usual"))),
    "tddui-questionnaire-response/inv/auto-eval-porteur": (qr("Patient/1"), qr("Patient/1", "TDDUIHolder")),
    "tddui-questionnaire-response/inv/professionnel-requis": (
        qr("RelatedPerson/1", "TDDUIHolder"), qr("RelatedPerson/1", "TDDUIResponsible")),
    "tddui-slot-presence-absence/inv/motifAbsenceCardinality": (slot("2"), slot("2", appointment=True)),
    "tddui-slot-presence-absence/inv/absencePrevueCardinality": (slot("2"), slot("2", planned=True)),
}


def run(inv: Invariant, node: dict[str, Any]) -> list[tuple[str | None, str, str]]:
    ctx = Context("en", lambda _ref: None)
    inv.run(node, "X", ctx)
    return [(i.rule, i.code, i.expression[0]) for i in ctx.out]


def test_every_invariant_has_samples() -> None:
    assert set(all_invariants()) == set(SAMPLES)


@pytest.mark.parametrize("rule", sorted(SAMPLES))
def test_invariant_fires_on_its_violation(rule: str) -> None:
    inv = all_invariants()[rule]
    bad, _ = SAMPLES[rule]
    assert run(inv, bad) == [(rule, "invariant", "X")]
    assert holds(inv.function, bad) is False  # fhirpathpy itself, not only the twin or a guard


@pytest.mark.parametrize("rule", sorted(SAMPLES))
def test_invariant_holds_on_its_satisfying_sample(rule: str) -> None:
    inv = all_invariants()[rule]
    _, good = SAMPLES[rule]
    assert run(inv, good) == []
    assert holds(inv.function, good) is True


@pytest.mark.parametrize("rule", sorted(SAMPLES))
def test_invariant_expression_evaluates_on_empty_content(rule: str) -> None:
    inv = all_invariants()[rule]
    _, good = SAMPLES[rule]
    empty = {"resourceType": good["resourceType"]} if "resourceType" in good else {}
    assert holds(inv.function, empty) is True  # an absent antecedent never breaks, and never errors
