"""Base R4 invariants of the data types TDDUI's resources can carry (issue 17, second pass): Timing
(tim-*), SimpleQuantity (sqty-1), MoneyQuantity (mqty-1), DataRequirement (drq-*), TriggerDefinition
(trd-*), and bdl-7 with meta.versionId. Each a broken instance with the exact rule and expression, and
a valid one that draws no error; the twins are also checked against fhirpathpy on the R4 texts.

Where they occur in a TDDUI Bundle: Timing in ServiceRequest.occurrence[x], Observation.effective[x],
CarePlan.activity.detail.scheduled[x] and any Extension.value[x] / Task.input.value[x]; SimpleQuantity
in Range.low/high, CarePlan.activity.detail.quantity/dailyAmount, Dosage; DataRequirement and
TriggerDefinition in Extension.value[x] and Task.input/output.value[x]. ElementDefinition (eld-*) is not
evaluated: only StructureDefinition.snapshot/differential have that type, no element of a TDDUI resource
nor Extension.value[x] can carry it, and a StructureDefinition is not data a DUI transfers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.core.outcome import Issue
from services.validator import r4
from services.validator.invariants import compiled, holds
from services.validator.logic import validate_bundle
from tests.fixtures.tddui import make_bundle

BASE = make_bundle(29)  # 1 Patient INS, 11 ServiceRequest besoin, 23 Goal projet de vie
X = "https://relais-test.fr/StructureDefinition/x"

Mutation = Callable[[dict[str, Any]], Any]


def run(mutate: Mutation) -> list[Issue]:
    bundle = orjson.loads(orjson.dumps(BASE))
    mutate(bundle)
    return validate_bundle(bundle)


def errors(issues: list[Issue]) -> list[tuple[str | None, str | None]]:
    return [(i.rule, i.expression[0] if i.expression else None) for i in issues if i.is_error]


def r(bundle: dict[str, Any], i: int) -> dict[str, Any]:
    return bundle["entry"][i]["resource"]  # type: ignore[no-any-return]


def repeat(**fields: Any) -> Mutation:
    return lambda b: r(b, 11).update(occurrenceTiming={"repeat": fields})


def extension(**value: Any) -> Mutation:
    """An extension on the Patient (entry 1) carrying `value` (e.g. valueRange=...)."""
    return lambda b: r(b, 1)["extension"].append({"url": X, **value})


TIMING = "Bundle.entry[11].resource.occurrenceTiming.repeat"
EXT = "Bundle.entry[1].resource.extension[2]"
TRIGGER = {"type": "data-added", "data": [{"type": "Observation"}]}

BROKEN: list[Any] = [
    pytest.param(repeat(duration=2), "fhir-r4/Timing/inv/tim-1", TIMING, id="tim-1"),
    pytest.param(repeat(period=1), "fhir-r4/Timing/inv/tim-2", TIMING, id="tim-2"),
    pytest.param(repeat(duration=-1, durationUnit="h"), "fhir-r4/Timing/inv/tim-4", TIMING, id="tim-4"),
    pytest.param(repeat(period=-1.5, periodUnit="d"), "fhir-r4/Timing/inv/tim-5", TIMING, id="tim-5"),
    pytest.param(repeat(periodMax=2, periodUnit="d"), "fhir-r4/Timing/inv/tim-6", TIMING, id="tim-6"),
    pytest.param(repeat(durationMax=2, durationUnit="h"), "fhir-r4/Timing/inv/tim-7", TIMING, id="tim-7"),
    pytest.param(repeat(countMax=3), "fhir-r4/Timing/inv/tim-8", TIMING, id="tim-8"),
    pytest.param(repeat(offset=30), "fhir-r4/Timing/inv/tim-9", TIMING, id="tim-9-no-when"),
    pytest.param(repeat(offset=30, when=["CM"]), "fhir-r4/Timing/inv/tim-9", TIMING, id="tim-9-meal"),
    pytest.param(repeat(timeOfDay=["08:00:00"], when=["MORN"]), "fhir-r4/Timing/inv/tim-10", TIMING, id="tim-10"),
    pytest.param(extension(valueTiming={"repeat": {"duration": 1}}), "fhir-r4/Timing/inv/tim-1",
                 f"{EXT}.valueTiming.repeat", id="tim-1-in-extension"),
    pytest.param(extension(valueRange={"low": {"value": 1, "comparator": ">"}}),
                 "fhir-r4/SimpleQuantity/inv/sqty-1", f"{EXT}.valueRange.low", id="sqty-1-range"),
    pytest.param(extension(valueDosage={"doseAndRate": [{"doseQuantity": {"value": 1, "comparator": "<"}}]}),
                 "fhir-r4/SimpleQuantity/inv/sqty-1", f"{EXT}.valueDosage.doseAndRate[0].doseQuantity",
                 id="sqty-1-dosage"),
    pytest.param(extension(valueDataRequirement={"type": "Observation", "codeFilter": [{"code": [{"code": "x"}]}]}),
                 "fhir-r4/DataRequirement/inv/drq-1", f"{EXT}.valueDataRequirement.codeFilter[0]", id="drq-1"),
    pytest.param(extension(valueDataRequirement={"type": "Observation", "dateFilter": [
        {"path": "effective", "searchParam": "date", "valueDateTime": "2025-01-01"}]}),
        "fhir-r4/DataRequirement/inv/drq-2", f"{EXT}.valueDataRequirement.dateFilter[0]", id="drq-2"),
    pytest.param(extension(valueTriggerDefinition={**TRIGGER, "timingDate": "2025-01-01"}),
                 "fhir-r4/TriggerDefinition/inv/trd-1", f"{EXT}.valueTriggerDefinition", id="trd-1"),
    pytest.param(extension(valueTriggerDefinition={"type": "named-event", "name": "admission", "condition": {
        "language": "text/fhirpath", "expression": "true"}}),
        "fhir-r4/TriggerDefinition/inv/trd-2", f"{EXT}.valueTriggerDefinition", id="trd-2"),
    pytest.param(extension(valueTriggerDefinition={"type": "named-event"}), "fhir-r4/TriggerDefinition/inv/trd-3",
                 f"{EXT}.valueTriggerDefinition", id="trd-3-name"),
    pytest.param(extension(valueTriggerDefinition={"type": "periodic", "name": "x"}),
                 "fhir-r4/TriggerDefinition/inv/trd-3", f"{EXT}.valueTriggerDefinition", id="trd-3-timing"),
]


@pytest.mark.parametrize(("mutate", "rule", "expression"), BROKEN)
def test_broken_instance_is_reported_with_rule_and_expression(mutate: Mutation, rule: str, expression: str) -> None:
    assert errors(run(mutate)) == [(rule, expression)]


VALID: list[Any] = [
    pytest.param(repeat(count=1, countMax=2, duration=1, durationMax=2, durationUnit="h", period=1, periodMax=2,
                        periodUnit="d", offset=30, when=["ACM"]), id="timing-full"),
    pytest.param(repeat(timeOfDay=["08:00:00"], period=1, periodUnit="d"), id="timing-time-of-day"),
    pytest.param(repeat(_duration={"extension": [{"url": X, "valueString": "inconnue"}]}, durationUnit="h"),
                 id="tim-4-duration-by-extension-only"),
    pytest.param(extension(valueRange={"low": {"value": 1, "unit": "h", "system": "http://unitsofmeasure.org",
                                               "code": "h"}, "high": {"value": 2}}), id="simple-quantity"),
    pytest.param(extension(valueQuantity={"value": 1, "comparator": ">"}), id="quantity-comparator-allowed"),
    pytest.param(extension(valueDataRequirement={"type": "Observation", "codeFilter": [{"path": "code"}],
                                                 "dateFilter": [{"searchParam": "date"}]}), id="data-requirement"),
    pytest.param(extension(valueTriggerDefinition=TRIGGER), id="trigger-data"),
    pytest.param(extension(valueTriggerDefinition={"type": "periodic", "timingTiming": {"repeat": {
        "period": 1, "periodUnit": "d"}}}), id="trigger-periodic"),
]


@pytest.mark.parametrize("mutate", VALID)
def test_valid_instance_draws_no_error(mutate: Mutation) -> None:
    assert errors(run(mutate)) == []


# --- gol-1, which fhirpathpy could not see (a choice element on an untyped object): now its twin's ------


def test_goal_target_detail_without_measure_breaks_gol_1() -> None:
    def detail_only(b: dict[str, Any]) -> None:
        r(b, 23)["target"] = [{"detailQuantity": {"value": 1}}]

    def both(b: dict[str, Any]) -> None:
        r(b, 23)["target"] = [{"detailQuantity": {"value": 1}, "measure": {"text": "poids"}}]

    assert ("fhir-r4/Goal/inv/gol-1", "Bundle.entry[23].resource.target[0]") in errors(run(detail_only))
    assert [e for e in errors(run(both)) if e[0] == "fhir-r4/Goal/inv/gol-1"] == []


# --- MoneyQuantity: no R4 element has that type (only profiles use it), so the twin is called directly ----


def _money_quantity(node: dict[str, Any]) -> list[str | None]:
    w = r4.Walk("en", "Invoice.x")
    r4._money_quantity(w, node, None, None)
    return [i.rule for i in w.out]


def test_money_quantity_needs_a_currency_code_and_iso_4217() -> None:
    assert _money_quantity({"value": 12}) == ["fhir-r4/MoneyQuantity/inv/mqty-1"]
    assert _money_quantity({"value": 12, "code": "EUR", "system": "http://unitsofmeasure.org"}) == [
        "fhir-r4/MoneyQuantity/inv/mqty-1"]
    assert _money_quantity({"value": 12, "code": "EUR", "system": "urn:iso:std:iso:4217"}) == []


# --- twins vs the R4 FHIRPath texts (fhirpathpy on the same JSON) ------------------------------------

_NUM = st.one_of(st.integers(-2, 3), st.sampled_from([0.5, -0.5]))
_REPEAT = st.fixed_dictionaries({}, optional={
    "duration": _NUM, "durationUnit": st.just("h"), "durationMax": _NUM, "period": _NUM, "periodUnit": st.just("d"),
    "periodMax": _NUM, "count": st.just(1), "countMax": st.just(2), "offset": st.just(10),
    "when": st.lists(st.sampled_from(["C", "CM", "MORN", "ACM"]), min_size=1, max_size=1),
    "timeOfDay": st.just(["08:00:00"])})
_FILTER = st.fixed_dictionaries({}, optional={"path": st.just("code"), "searchParam": st.just("code")})
_QUANTITY = st.fixed_dictionaries({}, optional={"value": _NUM, "comparator": st.just("<"), "code": st.just("EUR"),
                                                "system": st.sampled_from(["urn:iso:std:iso:4217", "http://x"])})
_TWINS: dict[str, tuple[Callable[..., None], Any]] = {
    **{k: (r4._timing_repeat, _REPEAT) for k in ("tim-1", "tim-2", "tim-4", "tim-5", "tim-6", "tim-7", "tim-8",
                                                 "tim-9", "tim-10")},
    "drq-1": (r4._path_xor_search("drq-1"), _FILTER),
    "sqty-1": (r4._simple_quantity, _QUANTITY),
    "mqty-1": (r4._money_quantity, _QUANTITY),
}


@pytest.mark.parametrize("key", sorted(_TWINS))
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_twin_agrees_with_fhirpathpy(key: str, data: st.DataObject) -> None:
    twin, strategy = _TWINS[key]
    node = data.draw(strategy)
    w = r4.Walk("en", "X")
    twin(w, node, None, None)
    broken = any(i.rule is not None and i.rule.endswith(f"/{key}") for i in w.out)
    assert holds(compiled(r4.invariants()[key][1]), node) is (not broken), node


# --- bdl-7: the same fullUrl is allowed for two versions of a resource ------------------------------


def _same_full_url(v1: str | None, v2: str | None) -> Mutation:
    def mutate(b: dict[str, Any]) -> None:
        b["entry"][5]["fullUrl"] = b["entry"][4]["fullUrl"]
        for i, version in ((4, v1), (5, v2)):
            if version is not None:
                r(b, i).setdefault("meta", {})["versionId"] = version
    return mutate


def test_bdl_7_same_full_url_same_version_is_an_error() -> None:
    for v1, v2 in ((None, None), ("1", "1")):
        assert ("tddui-bundle-fullurl-unique", "Bundle.entry[5].fullUrl") in errors(run(_same_full_url(v1, v2)))


def test_bdl_7_same_full_url_with_different_versions_is_allowed() -> None:
    for v1, v2 in (("1", "2"), (None, "2")):
        assert [e for e in errors(run(_same_full_url(v1, v2))) if e[0] == "tddui-bundle-fullurl-unique"] == []
