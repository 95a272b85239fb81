"""Base FHIR R4 rules the fhir.resources models leave out, found in one typed walk of the Bundle.

The R4B models parse in *lax* mode: `"false"` becomes a boolean, `"3.20"` a decimal, and `null`,
`[]` and `{}` pass. FHIR's JSON format is strict, so this walk checks every value against the JSON
type its element's FHIR type demands (types from fhirpathpy's R4 model), and evaluates on the way
the base invariants of the data types (`ele-1`, `ext-1`, `per-1`, `qty-3`, `ref-1`, `txt-1`, ...),
the closed code systems (v2-0203 identifier types, currencies, MIME types, BCP-47 languages) and the
contained-resource rules `dom-2`…`dom-5`. Each invariant's FHIRPath text is the R4 definition's,
kept in `fhir-r4-base.yaml`; here it is evaluated by a Python twin, because this runs on every
element of every Bundle (`tests/unit/validator/test_r4.py` holds one broken instance per rule).

Rule ids: `fhir-r4/json-type`, `fhir-r4/json-null`, `fhir-r4/<Type>/inv/<key>`, `fhir-r4/code/<system>`.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Callable
from typing import Any, Final

import yaml
from fhirpathpy.models import models

from services.core.outcome import Issue
from services.validator.jsonwalk import Chain, spell
from services.validator.messages import quote, say
from services.validator.ruleset import rules_dir

RULE_JSON_TYPE: Final = "fhir-r4/json-type"
RULE_JSON_NULL: Final = "fhir-r4/json-null"
RULE_ELE_1: Final = "fhir-r4/Element/inv/ele-1"

_MODEL: Final = models["r4"]
_PATH_TYPE: Final[dict[str, str]] = _MODEL["path2Type"]
_ELSEWHERE: Final[dict[str, str]] = _MODEL["pathsDefinedElsewhere"]
_PARENT: Final[dict[str, str]] = _MODEL["type2Parent"]
_BACKBONES: Final = frozenset(p.rsplit(".", 1)[0] for p in _PATH_TYPE if "." in p) - frozenset(_PARENT)

# JSON type of each FHIR primitive (FHIR R4 §2.6.2 JSON representation of primitive elements).
_INTEGERS: Final = frozenset({"integer", "positiveInt", "unsignedInt"})

# Kinds of element: primitive (with the FHIR type), complex data type, backbone element, resource.
PRIMITIVE, COMPLEX, BACKBONE, RESOURCE = 0, 1, 2, 3
Spec = tuple[int, str]  # (kind, FHIR type name or backbone path)


def _lineage(tpath: str) -> list[str]:
    """Where `tpath`'s elements may be defined: itself, then its ancestors (a backbone: BackboneElement)."""
    if tpath in _BACKBONES and tpath not in _PARENT:
        return [tpath, "BackboneElement", "Element"]
    out = [tpath]
    while (parent := _PARENT.get(out[-1])) is not None:
        out.append(parent)
    return out


@functools.cache
def child(tpath: str, key: str) -> Spec | None:
    """The kind and type of element `key` (a JSON key, choices spelled out) of type or backbone `tpath`."""
    for base in _lineage(tpath):
        path = f"{base}.{key}"
        path = _ELSEWHERE.get(path, path)
        ftype = _PATH_TYPE.get(path)
        if ftype is not None:
            if ftype == "System.String" or ftype == "xhtml":
                return PRIMITIVE, "string"
            if ftype == "Resource":
                return RESOURCE, ftype
            if ftype[:1].islower():
                return PRIMITIVE, ftype
            return COMPLEX, ftype
        if path in _BACKBONES:
            return BACKBONE, path
    return None


def _json_name(ftype: str) -> str:
    if ftype == "boolean":
        return "true/false"
    if ftype in _INTEGERS:
        return "a JSON integer"
    if ftype == "decimal":
        return "a JSON number"
    return "a JSON string"


# --- the walk ------------------------------------------------------------------------------------


class Walk:
    """One Bundle's walk: the issues found, and what the invariant twins need (root resource, language)."""

    __slots__ = ("base", "lang", "out")

    def __init__(self, lang: str, base: str) -> None:
        self.lang, self.base = lang, base  # base: the FHIRPath of the walk's root
        self.out: list[Issue] = []

    def add(self, rule: str, kind: str, where: str, template: str, **values: object) -> None:
        self.out.append(Issue("error", kind, say(self.lang, template, **values), (where,), rule))

    def invariant(self, ftype: str, key: str, at: str) -> None:
        human, _ = invariants()[key]
        self.add(f"fhir-r4/{ftype}/inv/{key}", "invariant", at, "invariant", at=at, key=key, human=human,
                 profile=f"FHIR R4 {ftype}")


Frame = tuple[Any, str, Chain, Any]  # (JSON node, type or backbone path, location chain, root resource)


def check_r4(bundle: dict[str, Any], lang: str = "en") -> list[Issue]:
    """Every strict-JSON, data-type invariant, closed-code and contained-resource finding of the Bundle."""
    return check_r4_resource(bundle, "Bundle", lang)


def check_r4_resource(resource: dict[str, Any], at: str, lang: str = "en") -> list[Issue]:
    """The same findings for one resource located at `at` (its resourceType names its R4 type)."""
    rtype = resource.get("resourceType")
    if type(rtype) is not str or rtype not in _PARENT:
        return []
    w = Walk(lang, at)
    stack: list[Frame] = [(resource, rtype, None, resource)]
    pop, push = stack.pop, stack.append
    while stack:
        node, tpath, chain, root = pop()
        if not node:
            w.add(RULE_ELE_1, "structure", spell(w.base, chain), "ele-1", at=spell(w.base, chain))
            continue
        kids = _KIDS.get(tpath)
        if kids is None:
            kids = _KIDS[tpath] = {}
        for key, value in node.items():
            spec = kids.get(key)
            if spec is None:
                spec = kids[key] = _spec(tpath, key)
            kind = spec[0]
            if kind == PRIMITIVE:
                if type(value) in spec[2] and value != "":
                    continue  # the usual case: a well-typed primitive with nothing more to check
            elif kind == SKIP:
                continue  # resourceType, or not an R4 element (the structure check says so)
            elif kind == TWIN:
                _primitive_twin(w, node, key, value, chain, root, push)
                continue
            elif (kind == COMPLEX or kind == BACKBONE) and type(value) is dict:
                if value:
                    push((value, spec[1], (chain, key), root))
                else:  # {}: ele-1, said here without a frame
                    where = spell(w.base, (chain, key))
                    w.add(RULE_ELE_1, "structure", where, "ele-1", at=where)
                continue
            kchain = (chain, key)
            if type(value) is list:
                if not value:
                    w.add(RULE_ELE_1, "structure", spell(w.base, kchain), "ele-1-array", at=spell(w.base, kchain))
                    continue
                twin = node.get("_" + key) if kind == PRIMITIVE or kind == CODED else None
                for i, item in enumerate(value):
                    if item is None:
                        if not (type(twin) is list and i < len(twin) and twin[i] is not None):
                            where = spell(w.base, (kchain, i))
                            w.add(RULE_JSON_NULL, "structure", where, "json-null", at=where)
                        continue
                    # `_value`'s two usual cases inlined (arrays of objects and of well-typed primitives).
                    if kind == COMPLEX or kind == BACKBONE:
                        if type(item) is dict:
                            push((item, spec[1], (kchain, i), root))
                        continue
                    if kind == PRIMITIVE and type(item) in spec[2] and item != "":
                        continue
                    _value(w, spec, item, (kchain, i), root, push)
            elif value is None:
                if (kind != PRIMITIVE and kind != CODED) or node.get("_" + key) is None:
                    where = spell(w.base, kchain)
                    w.add(RULE_JSON_NULL, "structure", where, "json-null", at=where)
            else:
                _value(w, spec, value, kchain, root, push)
        rules = _TYPE_RULES.get(tpath)
        if rules is not None:
            for rule in rules:
                rule(w, node, chain, root)
    return w.out


# Kinds beyond `child`'s: a key to skip, a primitive's `_name` twin, a code of a closed system.
SKIP, TWIN, CODED = 4, 5, 6
Kid = tuple[int, str, tuple[type, ...]]  # (kind, FHIR type, the Python types of a well-typed JSON value)
_KIDS: dict[str, dict[str, Kid]] = {}  # type or backbone path → JSON key → Kid (filled as keys are met)
_NOTHING: Final[tuple[type, ...]] = ()


def _spec(tpath: str, key: str) -> Kid:
    if key == "resourceType":
        return SKIP, "", _NOTHING
    if key[:1] == "_":
        found = child(tpath, key[1:])
        return (TWIN, "", _NOTHING) if found is not None and found[0] == PRIMITIVE else (SKIP, "", _NOTHING)
    found = child(tpath, key)
    if found is None:
        return SKIP, "", _NOTHING
    kind, ftype = found
    if kind != PRIMITIVE:
        if ftype == "Quantity" and f"{tpath}.{key}" in _SIMPLE_QUANTITY:
            ftype = "SimpleQuantity"  # the R4 definitions profile these Quantity elements (sqty-1)
        return kind, ftype, _NOTHING
    if ftype == "code" and key in _PRIMITIVE_CODES and tpath != "Expression":  # Expression.language: text/fhirpath
        return CODED, ftype, (str,)
    if ftype == "boolean":
        return kind, ftype, (bool,)
    if ftype in _INTEGERS:
        return kind, ftype, (int,)
    if ftype == "decimal":
        return kind, ftype, (int, float)
    return kind, ftype, (str,)


def _value(w: Walk, spec: Kid, value: Any, chain: Chain, root: Any, push: Callable[[Frame], None]) -> None:
    kind, ftype, jtypes = spec
    if kind == PRIMITIVE or kind == CODED:
        if type(value) not in jtypes:
            if type(value) in (dict, list):
                return  # an object or array for a primitive: the structure check reports it already
            at = spell(w.base, chain)
            w.add(RULE_JSON_TYPE, "structure", at, "json-type", at=at, ftype=ftype, json=_json_name(ftype),
                  value=quote(value))
        elif value == "":
            at = spell(w.base, chain)
            w.add(RULE_ELE_1, "structure", at, "ele-1-empty", at=at)
        elif kind == CODED:
            key = chain[1] if chain is not None else None
            if type(key) is int:
                key = chain[0][1] if chain[0] is not None else None  # type: ignore[index]
            check = _PRIMITIVE_CODES.get(key)  # type: ignore[arg-type]
            if check is not None:
                check(w, value, chain)
        return
    if type(value) is not dict:
        return  # a primitive or array where an object is expected: the structure check reports it
    if kind == RESOURCE:
        rtype = value.get("resourceType")
        if type(rtype) is str and rtype in _PARENT:
            push((value, rtype, chain, root if _is_contained(chain) else value))
        return
    push((value, ftype, chain, root))


def _is_contained(chain: Chain) -> bool:
    """True when the location is `....contained[i]` (its %rootResource is the container)."""
    return chain is not None and chain[0] is not None and chain[0][1] == "contained"


def _primitive_twin(w: Walk, node: dict[str, Any], key: str, value: Any, chain: Chain, root: Any,
                    push: Callable[[Frame], None]) -> None:
    """`_name`: the id and extensions of primitive `name`, an object (or array aligned with `name`'s)."""
    kchain = (chain, key)
    if type(value) is dict:
        push((value, "Element", kchain, root))
    elif type(value) is list:
        base = node.get(key[1:])
        for i, item in enumerate(value):
            if type(item) is dict:
                push((item, "Element", (kchain, i), root))
            elif item is None and not (type(base) is list and i < len(base) and base[i] is not None):
                at = spell(w.base, (kchain, i))
                w.add(RULE_JSON_NULL, "structure", at, "json-null", at=at)


# --- invariants of the data types (twins of the R4 FHIRPath, which fhir-r4-base.yaml keeps) -----


@functools.cache
def invariants() -> dict[str, tuple[str, str]]:
    """key → (human, FHIRPath) of every base R4 invariant Relais evaluates (from fhir-r4-base.yaml)."""
    doc = yaml.load(rules_dir().joinpath("fhir-r4-base.yaml").read_text("utf-8"),
                    Loader=yaml.CSafeLoader)
    return {i["key"]: (i["human"], i["expression"]) for i in doc["dataTypeInvariants"]}


@functools.cache
def codes() -> dict[str, frozenset[str]]:
    doc = yaml.load(rules_dir().joinpath("fhir-r4-codes.yaml").read_text("utf-8"),
                    Loader=yaml.CSafeLoader)
    return {name: frozenset(values) for name, values in doc.items()}


UCUM: Final = "http://unitsofmeasure.org"
V2_0203: Final = "http://terminology.hl7.org/CodeSystem/v2-0203"
_VALUE_KEYS: Final = frozenset(k.split(".", 1)[1] for k in _PATH_TYPE if k.startswith("Extension.value"))


def _has(node: dict[str, Any], key: str) -> bool:
    """FHIRPath `key.exists()` on a JSON object: the value or its `_key` extensions are there."""
    return node.get(key) is not None or node.get("_" + key) is not None


def _period(w: Walk, node: dict[str, Any], chain: Chain, _root: Any) -> None:
    start, end = node.get("start"), node.get("end")
    if type(start) is str and type(end) is str and _before(end, start):
        w.invariant("Period", "per-1", spell(w.base, chain))


def _before(a: str, b: str) -> bool:
    """True when instant `a` is certainly before `b` (FHIRPath: a comparison of unequal precision is empty)."""
    if len(a) == len(b) and len(a) <= 10:
        return a < b  # same-precision dates: the text order is the time order
    try:
        da = dt.datetime.fromisoformat(a.replace("Z", "+00:00"))
        db = dt.datetime.fromisoformat(b.replace("Z", "+00:00"))
    except ValueError:
        return False  # a malformed date is the structure check's finding
    if len(a) <= 10 or len(b) <= 10 or (da.tzinfo is None) != (db.tzinfo is None):
        return False  # unequal precision: FHIRPath's comparison is empty, the invariant holds
    return da < db


def _quantity(w: Walk, node: dict[str, Any], chain: Chain, _root: Any) -> None:
    if _has(node, "code") and not _has(node, "system"):
        w.invariant("Quantity", "qty-3", spell(w.base, chain))


def _ucum_only(ftype: str, key: str) -> Callable[[Walk, dict[str, Any], Chain, Any], None]:
    """dis-1 (Distance), age-1's unit half: a code needs the UCUM system, and a value needs a code."""
    def rule(w: Walk, node: dict[str, Any], chain: Chain, _root: Any) -> None:
        system = node.get("system")
        if (_has(node, "value") and not _has(node, "code")) or (system is not None and system != UCUM):
            w.invariant(ftype, key, spell(w.base, chain))
    return rule


def _duration(w: Walk, node: dict[str, Any], chain: Chain, _root: Any) -> None:
    if _has(node, "code") and not (node.get("system") == UCUM and _has(node, "value")):
        w.invariant("Duration", "drt-1", spell(w.base, chain))


def _age(w: Walk, node: dict[str, Any], chain: Chain, root: Any) -> None:
    value = node.get("value")
    system = node.get("system")
    if ((_has(node, "value") and not _has(node, "code")) or (system is not None and system != UCUM)
            or (isinstance(value, int | float) and not isinstance(value, bool) and value <= 0)):
        w.invariant("Age", "age-1", spell(w.base, chain))


def _count(w: Walk, node: dict[str, Any], chain: Chain, _root: Any) -> None:
    value, code, system = node.get("value"), node.get("code"), node.get("system")
    if ((_has(node, "value") and not _has(node, "code")) or (system is not None and system != UCUM)
            or (code is not None and code != "1") or (type(value) is float and not value.is_integer())):
        w.invariant("Count", "cnt-3", spell(w.base, chain))


def _simple_quantity(w: Walk, node: dict[str, Any], chain: Chain, _root: Any) -> None:
    if _has(node, "comparator"):
        w.invariant("SimpleQuantity", "sqty-1", spell(w.base, chain))


ISO_4217: Final = "urn:iso:std:iso:4217"


def _money_quantity(w: Walk, node: dict[str, Any], chain: Chain, _root: Any) -> None:
    system = node.get("system")
    if (_has(node, "value") and not _has(node, "code")) or (system is not None and system != ISO_4217):
        w.invariant("MoneyQuantity", "mqty-1", spell(w.base, chain))


# Where the R4 definitions type an element SimpleQuantity (a Quantity profile: fhirpathpy's model says
# Quantity), as type-or-backbone path + JSON key. No R4 element is typed MoneyQuantity: only profiles
# use it, and none of TDDUI's does, so mqty-1 applies where a walk is started on that type.
_SIMPLE_QUANTITY: Final = frozenset({
    "ActivityDefinition.quantity", "CarePlan.activity.detail.dailyAmount", "CarePlan.activity.detail.quantity",
    "Claim.item.detail.quantity", "Claim.item.detail.subDetail.quantity", "Claim.item.quantity",
    "ClaimResponse.addItem.detail.quantity", "ClaimResponse.addItem.detail.subDetail.quantity",
    "ClaimResponse.addItem.quantity", "Contract.term.asset.valuedItem.quantity",
    "Coverage.costToBeneficiary.valueQuantity", "CoverageEligibilityRequest.item.quantity",
    "Dosage.doseAndRate.doseQuantity", "Dosage.doseAndRate.rateQuantity", "Dosage.maxDosePerAdministration",
    "Dosage.maxDosePerLifetime", "ExplanationOfBenefit.addItem.detail.quantity",
    "ExplanationOfBenefit.addItem.detail.subDetail.quantity", "ExplanationOfBenefit.addItem.quantity",
    "ExplanationOfBenefit.item.detail.quantity", "ExplanationOfBenefit.item.detail.subDetail.quantity",
    "ExplanationOfBenefit.item.quantity", "Immunization.doseQuantity", "MedicationAdministration.dosage.dose",
    "MedicationAdministration.dosage.rateQuantity", "MedicationDispense.daysSupply", "MedicationDispense.quantity",
    "MedicationKnowledge.administrationGuidelines.patientCharacteristics.characteristicQuantity",
    "MedicationKnowledge.amount", "MedicationKnowledge.drugCharacteristic.valueQuantity",
    "MedicationKnowledge.kinetics.areaUnderCurve", "MedicationKnowledge.kinetics.lethalDose50",
    "MedicationKnowledge.packaging.quantity", "MedicationKnowledge.regulatory.maxDispense.quantity",
    "MedicationRequest.dispenseRequest.initialFill.quantity", "MedicationRequest.dispenseRequest.quantity",
    "NutritionOrder.enteralFormula.administration.quantity",
    "NutritionOrder.enteralFormula.administration.rateQuantity",
    "NutritionOrder.enteralFormula.caloricDensity", "NutritionOrder.enteralFormula.maxVolumeToDeliver",
    "NutritionOrder.oralDiet.nutrient.amount", "NutritionOrder.supplement.quantity",
    "Observation.referenceRange.high", "Observation.referenceRange.low", "Range.high", "Range.low",
    "SampledData.origin", "Specimen.collection.quantity", "Specimen.container.capacity",
    "Specimen.container.specimenQuantity", "SpecimenDefinition.typeTested.container.capacity",
    "SpecimenDefinition.typeTested.container.minimumVolumeQuantity", "Substance.instance.quantity",
    "SupplyDelivery.suppliedItem.quantity", "VisionPrescription.lensSpecification.duration",
})


def _timing_repeat(w: Walk, node: dict[str, Any], chain: Chain, _root: Any) -> None:
    """tim-1…tim-10 (no tim-3 in R4) on Timing.repeat."""
    at = spell(w.base, chain)
    if _has(node, "duration") and not _has(node, "durationUnit"):
        w.invariant("Timing", "tim-1", at)
    if _has(node, "period") and not _has(node, "periodUnit"):
        w.invariant("Timing", "tim-2", at)
    if _negative(node.get("duration")):
        w.invariant("Timing", "tim-4", at)
    if _negative(node.get("period")):
        w.invariant("Timing", "tim-5", at)
    if _has(node, "periodMax") and not _has(node, "period"):
        w.invariant("Timing", "tim-6", at)
    if _has(node, "durationMax") and not _has(node, "duration"):
        w.invariant("Timing", "tim-7", at)
    if _has(node, "countMax") and not _has(node, "count"):
        w.invariant("Timing", "tim-8", at)
    when = node.get("when")
    if _has(node, "offset") and (not _has(node, "when") or (type(when) is list and any(
            x in ("C", "CM", "CD", "CV") for x in when))):
        w.invariant("Timing", "tim-9", at)
    if _has(node, "timeOfDay") and _has(node, "when"):
        w.invariant("Timing", "tim-10", at)


def _negative(value: object) -> bool:
    return type(value) in (int, float) and value < 0  # type: ignore[operator]


def _path_xor_search(key: str) -> Callable[[Walk, dict[str, Any], Chain, Any], None]:
    """drq-1 (codeFilter), drq-2 (dateFilter): a path or a searchParam, not both."""
    def rule(w: Walk, node: dict[str, Any], chain: Chain, _root: Any) -> None:
        if _has(node, "path") == _has(node, "searchParam"):
            w.invariant("DataRequirement", key, spell(w.base, chain))
    return rule


_TIMING_KEYS: Final = ("timingTiming", "timingReference", "timingDate", "timingDateTime")


def _trigger(w: Walk, node: dict[str, Any], chain: Chain, _root: Any) -> None:
    at = spell(w.base, chain)
    data = _has(node, "data")
    timing = any(_has(node, k) for k in _TIMING_KEYS)
    if data and timing:
        w.invariant("TriggerDefinition", "trd-1", at)
    if _has(node, "condition") and not data:
        w.invariant("TriggerDefinition", "trd-2", at)
    kind = node.get("type")
    if type(kind) is str and ((kind == "named-event" and not _has(node, "name"))
                              or (kind == "periodic" and not timing)
                              or (kind.startswith("data-") and not data)):
        w.invariant("TriggerDefinition", "trd-3", at)


def _range(w: Walk, node: dict[str, Any], chain: Chain, _root: Any) -> None:
    low, high = node.get("low"), node.get("high")
    if type(low) is dict and type(high) is dict:
        a, b = low.get("value"), high.get("value")
        if (isinstance(a, int | float) and isinstance(b, int | float) and a > b
                and low.get("code") == high.get("code") and low.get("system") == high.get("system")):
            w.invariant("Range", "rng-2", spell(w.base, chain))


def _ratio(w: Walk, node: dict[str, Any], chain: Chain, _root: Any) -> None:
    num, den = _has(node, "numerator"), _has(node, "denominator")
    if num != den or not (num or _has(node, "extension")):
        w.invariant("Ratio", "rat-1", spell(w.base, chain))


def _attachment(w: Walk, node: dict[str, Any], chain: Chain, _root: Any) -> None:
    if _has(node, "data") and not _has(node, "contentType"):
        w.invariant("Attachment", "att-1", spell(w.base, chain))


def _contact_point(w: Walk, node: dict[str, Any], chain: Chain, _root: Any) -> None:
    if _has(node, "value") and not _has(node, "system"):
        w.invariant("ContactPoint", "cpt-2", spell(w.base, chain))


def _reference(w: Walk, node: dict[str, Any], chain: Chain, root: Any) -> None:
    ref = node.get("reference")
    if type(ref) is str and ref.startswith("#") and ref != "#":
        contained = root.get("contained") if type(root) is dict else None
        ids = {c.get("id") for c in contained if type(c) is dict} if type(contained) is list else set()
        if ref[1:] not in ids:
            w.invariant("Reference", "ref-1", spell(w.base, chain))


def _extension(w: Walk, node: dict[str, Any], chain: Chain, _root: Any) -> None:
    nested = bool(node.get("extension"))
    valued = any(k in _VALUE_KEYS or (k[:1] == "_" and k[1:] in _VALUE_KEYS) for k in node)
    if nested == valued:
        w.invariant("Extension", "ext-1", spell(w.base, chain))


# txt-1: only the XHTML subset FHIR allows (no script, no event handlers, no forms, no external
# images); txt-2: some text. Checked on the markup's text, without an XML parser on the hot path.
_DIV_OPEN: Final = re.compile(r'\s*<div\b[^>]*\bxmlns\s*=\s*"http://www\.w3\.org/1999/xhtml"', re.S)
_FORBIDDEN: Final = re.compile(
    r"<\s*(script|style|form|input|button|select|textarea|iframe|object|embed|applet|base|link|meta|frame|frameset)\b"
    r"|\son[a-z]+\s*=|javascript:", re.I)
_TAG: Final = re.compile(r"<[^>]*>")


def _narrative(w: Walk, node: dict[str, Any], chain: Chain, _root: Any) -> None:
    div = node.get("div")
    if type(div) is not str:
        return
    at = spell(w.base, (chain, "div"))
    if not _DIV_OPEN.match(div) or not div.rstrip().endswith("</div>") or _FORBIDDEN.search(div):
        w.invariant("Narrative", "txt-1", at)
    elif not _TAG.sub("", div).strip() and "<img" not in div:
        w.invariant("Narrative", "txt-2", at)


def _coding(w: Walk, node: dict[str, Any], chain: Chain, _root: Any) -> None:
    system, code = node.get("system"), node.get("code")
    if system == V2_0203 and type(code) is str and code not in codes()["v2-0203"]:
        at = spell(w.base, (chain, "code"))
        w.add("fhir-r4/code/v2-0203", "code-invalid", at, "code-unknown", at=at, code=quote(code),
              system=V2_0203, what="HL7 v2 table 0203 (identifier type)")
    elif system == "urn:ietf:bcp:47" and type(code) is str:
        _language(w, code, (chain, "code"))
    elif system == "urn:iso:std:iso:4217" and type(code) is str:
        _currency(w, code, (chain, "code"))


def _money(w: Walk, node: dict[str, Any], chain: Chain, _root: Any) -> None:
    currency = node.get("currency")
    if type(currency) is str:
        _currency(w, currency, (chain, "currency"))


def _currency(w: Walk, code: str, chain: Chain) -> None:
    if code not in codes()["currencies"]:
        at = spell(w.base, chain)
        w.add("fhir-r4/code/currencies", "code-invalid", at, "code-unknown", at=at, code=quote(code),
              system="urn:iso:std:iso:4217", what="ISO 4217 currencies")


# BCP-47 (RFC 5646) language tag, the common forms: language[-script][-region][-variant]*[-ext]*[-x-private].
_BCP47: Final = re.compile(
    r"(?P<lang>[A-Za-z]{2,3})(-[A-Za-z]{3}){0,3}(-[A-Za-z]{4})?(-([A-Za-z]{2}|[0-9]{3}))?"
    r"(-([A-Za-z0-9]{5,8}|[0-9][A-Za-z0-9]{3}))*(-[0-9A-WY-Za-wy-z](-[A-Za-z0-9]{2,8})+)*(-x(-[A-Za-z0-9]{1,8})+)?"
    r"|x(-[A-Za-z0-9]{1,8})+")


def _language(w: Walk, code: object, chain: Chain) -> None:
    if type(code) is not str:
        return
    found = _BCP47.fullmatch(code)
    lang = found.group("lang") if found else None
    table = codes()["languages2" if lang and len(lang) == 2 else "languages3"]
    if found is None or (lang is not None and lang.lower() not in table):
        at = spell(w.base, chain)
        w.add("fhir-r4/code/languages", "code-invalid", at, "code-unknown", at=at, code=quote(code),
              system="urn:ietf:bcp:47", what="BCP-47 language tags")


# MIME type (BCP-13, RFC 6838 §4.2): type/subtype, optional parameters.
_MIME: Final = re.compile(
    r"(application|audio|font|example|image|message|model|multipart|text|video)/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
    r"(\s*;\s*[A-Za-z0-9!#$&^_.+-]+=(\"[^\"]*\"|[A-Za-z0-9!#$&^_.+-]+))*", re.I)


def _mime(w: Walk, code: object, chain: Chain) -> None:
    if type(code) is str and not _MIME.fullmatch(code):
        at = spell(w.base, chain)
        w.add("fhir-r4/code/mimetypes", "code-invalid", at, "code-unknown", at=at, code=quote(code),
              system="urn:ietf:bcp:13", what="MIME types (BCP-13)")


# Primitive elements whose value is a code of a closed system, by JSON key (wherever they appear,
# their type fixes the binding: `contentType` is Attachment's, `language` Resource's or Attachment's).
_PRIMITIVE_CODES: Final[dict[str, Callable[[Walk, Any, Chain], None]]] = {
    "contentType": _mime,
    "language": _language,
}


def _resource(w: Walk, node: dict[str, Any], chain: Chain, _root: Any) -> None:
    """dom-2…dom-5: what a contained resource may not carry, and that it is referenced."""
    contained = node.get("contained")
    if type(contained) is not list or not contained:
        return
    at = spell(w.base, chain)
    refs: set[str] | None = None
    for i, inner in enumerate(contained):
        if type(inner) is not dict:
            continue
        if inner.get("contained"):
            w.invariant("DomainResource", "dom-2", f"{at}.contained[{i}]")
        meta = inner.get("meta")
        if type(meta) is dict:
            if _has(meta, "versionId") or _has(meta, "lastUpdated"):
                w.invariant("DomainResource", "dom-4", f"{at}.contained[{i}]")
            if meta.get("security"):
                w.invariant("DomainResource", "dom-5", f"{at}.contained[{i}]")
        if refs is None:
            refs = _local_references(node)
        rid = inner.get("id")
        if "#" not in refs and not (type(rid) is str and "#" + rid in refs):
            w.invariant("DomainResource", "dom-3", f"{at}.contained[{i}]")


def _local_references(node: Any) -> set[str]:
    """Every '#…' string under `node` (references, canonicals and uris alike), contained resources included."""
    found: set[str] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if type(current) is dict:
            stack.extend(current.values())
        elif type(current) is list:
            stack.extend(current)
        elif type(current) is str and current[:1] == "#":
            found.add(current)
    return found


_TYPE_RULES: Final[dict[str, tuple[Callable[[Walk, dict[str, Any], Chain, Any], None], ...]]] = {
    "Period": (_period,),
    "Quantity": (_quantity,),
    "SimpleQuantity": (_quantity, _simple_quantity),
    "MoneyQuantity": (_quantity, _money_quantity),
    "Timing.repeat": (_timing_repeat,),
    "DataRequirement.codeFilter": (_path_xor_search("drq-1"),),
    "DataRequirement.dateFilter": (_path_xor_search("drq-2"),),
    "TriggerDefinition": (_trigger,),
    "Age": (_quantity, _age),
    "Distance": (_quantity, _ucum_only("Distance", "dis-1")),
    "Duration": (_quantity, _duration),
    "Count": (_quantity, _count),
    "Range": (_range,),
    "Ratio": (_ratio,),
    "Attachment": (_attachment,),
    "ContactPoint": (_contact_point,),
    "Reference": (_reference,),
    "Extension": (_extension,),
    "Narrative": (_narrative,),
    "Coding": (_coding,),
    "Money": (_money,),
    **{rtype: (_resource,) for rtype, parent in _PARENT.items() if parent == "DomainResource"},
}
