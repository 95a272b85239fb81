"""Python twins of the FHIRPath invariants every Bundle meets, so fhirpathpy runs only on odd content.

The FHIRPath text in the rule files stays the source of truth: a twin is found by the *exact*
expression text, so editing an expression silently retires its twin (fhirpathpy takes over) rather
than leaving a stale translation in charge. `tests/unit/validator/test_predicates.py` proves each
twin agrees with fhirpathpy on passing, failing and malformed samples.

A twin answers True (holds or does not apply), False (broken), or None: "this content is not the
plain JSON shape I was written for (a list where one object is expected, a null, a primitive's
`_element` sibling, ...), ask fhirpathpy", which keeps FHIRPath's collection semantics and its
evaluation errors exactly as they are.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Final

from fhirpathpy.models import models

Predicate = Callable[[Any], bool | None]

FR_CORE_RELIABILITY: Final = "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-identity-reliability"
QR_PARTICIPANT: Final = "https://interop.esante.gouv.fr/ig/fhir/tddui/StructureDefinition/tddui-qr-participant"
NIR, NIA, NIR_TEST, NIR_DEMO = (f"urn:oid:1.2.250.1.213.1.4.{n}" for n in (8, 9, 10, 11))

# The keys FHIRPath's `value` reads on an Extension: value + each R4 choice type.
_EXT_VALUE_KEYS: Final = frozenset(f"value{t}" for t in models["r4"]["choiceTypePaths"]["Extension.value"])
_ABSENT: Final = object()


class _Defer(Exception):
    """The content is not in the shape the twin handles: fhirpathpy decides."""


def _objects(node: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """node[key] as a list of JSON objects ([] when absent); any other shape defers."""
    value = node.get(key, _ABSENT)
    if value is _ABSENT and f"_{key}" not in node:
        return []
    if isinstance(value, list) and all(isinstance(v, dict) for v in value):
        return value
    raise _Defer


def _object(node: dict[str, Any], key: str) -> dict[str, Any] | None:
    """node[key] as one JSON object (None when absent); any other shape defers."""
    value = node.get(key, _ABSENT)
    if value is _ABSENT and f"_{key}" not in node:
        return None
    if isinstance(value, dict):
        return value
    raise _Defer


def _text(node: dict[str, Any], key: str) -> str | None:
    """node[key] as a string (None when absent); any other shape, or a `_key` sibling, defers."""
    if f"_{key}" in node:
        raise _Defer
    value = node.get(key, _ABSENT)
    if value is _ABSENT:
        return None
    if isinstance(value, str):
        return value
    raise _Defer


def _with_url(items: list[dict[str, Any]], url: str) -> list[dict[str, Any]]:
    """`extension.where(url = ...)` on objects already known to be JSON objects."""
    return [e for e in items if _text(e, "url") == url]


def _extension(items: list[dict[str, Any]], url: str) -> list[dict[str, Any]]:
    """The FHIRPath function `extension(url)` as fhirpathpy runs it: the *first* extension with that url
    (the spec says all of them; agreeing with the engine that evaluates the other invariants matters
    more here). fhirpathpy fails on an extension without a url, so that defers."""
    if any("url" not in e for e in items):
        raise _Defer
    return _with_url(items, url)[:1]


def _twin(fn: Callable[[dict[str, Any]], bool]) -> Predicate:
    def predicate(node: Any) -> bool | None:
        if not isinstance(node, dict):
            return None
        try:
            return fn(node)
        except _Defer:
            return None

    predicate.__name__ = predicate.__qualname__ = fn.__name__
    predicate.__doc__ = fn.__doc__
    return predicate


# --- FR Core Patient (tddui-patient-ins) -------------------------------------------------------------


def _identity_validated(patient: dict[str, Any]) -> bool:
    """extension(reliability).extension('identityStatus').value.exists(code = 'VALI')"""
    for reliability in _extension(_objects(patient, "extension"), FR_CORE_RELIABILITY):
        for status in _extension(_objects(reliability, "extension"), "identityStatus"):
            keys = status.keys() & _EXT_VALUE_KEYS
            if len(keys) > 1 or "value" in status:
                raise _Defer  # several value[x] (fhirpathpy reads one of them) or a bare `value`
            for key in keys:
                value = status[key]
                if isinstance(value, dict):
                    if _text(value, "code") == "VALI":
                        return True
                elif not isinstance(value, str | int | float | bool):  # lists, nulls: FHIRPath collections
                    raise _Defer
    return False


def _has_identifier(patient: dict[str, Any], system: str | None, use: str) -> int:
    """identifier.where([system = ... and] use = ...).count()"""
    return sum(1 for i in _objects(patient, "identifier")
               if _text(i, "use") == use and (system is None or _text(i, "system") == system))


@_twin
def fr_core_1(patient: dict[str, Any]) -> bool:
    """fr-core-1: a validated identity (VALI) carries an INS (NIR/NIR-TEST/NIR-DEMO official, or NIA temp)."""
    ids = [(_text(i, "system"), _text(i, "use")) for i in _objects(patient, "identifier")]
    if not _identity_validated(patient):
        return True
    return any(pair in ids for pair in ((NIR, "official"), (NIA, "temp"), (NIR_TEST, "official"),
                                        (NIR_DEMO, "official")))


@_twin
def fr_core_2(patient: dict[str, Any]) -> bool:
    """fr-core-2: a validated identity (VALI) has exactly one official identifier, or an NIA temp."""
    official, nia = _has_identifier(patient, None, "official"), _has_identifier(patient, NIA, "temp")
    return not _identity_validated(patient) or official == 1 or nia > 0


# --- QuestionnaireResponse ---------------------------------------------------------------------------


def _participant(qr: dict[str, Any], role: str) -> bool:
    """extension.where(url = qr-participant).extension.where(url = role).exists()"""
    return any(_with_url(_objects(p, "extension"), role)
               for p in _with_url(_objects(qr, "extension"), QR_PARTICIPANT))


@_twin
def auto_eval_porteur(qr: dict[str, Any]) -> bool:
    """auto-eval-porteur: a self-evaluation (source a Patient) names the holder (TDDUIHolder)."""
    source = _object(qr, "source")
    reference = _text(source, "reference") if source is not None else None
    holder = _participant(qr, "TDDUIHolder")
    # (source.exists() and source.reference.contains('Patient/')) implies holder; an empty antecedent
    # (no reference) makes `implies` empty or true: the invariant holds either way.
    return reference is None or "Patient/" not in reference or holder


@_twin
def professionnel_requis(qr: dict[str, Any]) -> bool:
    """professionnel-requis: unless a self-evaluation, an evaluator, an author or a responsible is named."""
    source = _object(qr, "source")
    reference = _text(source, "reference") if source is not None else None
    author = _object(qr, "author") is not None
    responsible = _participant(qr, "TDDUIResponsible")
    if reference is None or "Patient/" in reference:
        return True  # the antecedent is empty or false
    return "Practitioner/" in reference or author or responsible


# --- identifier formats: value.matches('<regex>') ----------------------------------------------------

_MATCHES: Final = re.compile(r"value\.matches\('([^'\\]*)'\)")


def value_matches(regex: str) -> Predicate:
    """`value.matches(regex)` on one Identifier, as fhirpathpy runs it (re.search, DOTALL)."""
    compiled = re.compile(regex, re.DOTALL)

    @_twin
    def matches(identifier: dict[str, Any]) -> bool:
        value = _text(identifier, "value")
        return value is None or compiled.search(value) is not None

    return matches


# --- base R4 resource invariants (fhir-r4-base.yaml), which run on every resource of their type --------


def _exists(node: dict[str, Any], key: str) -> bool:
    """`key.exists()`: a value (or a primitive's `_key`) other than null, [] ... ({} defers: FHIRPath
    sees an empty object as nothing, and ele-1 reports it anyway)."""
    value = node.get(key)
    if value is None or value == []:
        if node.get("_" + key) is not None:
            raise _Defer
        return False
    if value == {} or (isinstance(value, list) and any(v is None or v == {} for v in value)):
        raise _Defer
    return True


def _exists_any(node: dict[str, Any], prefix: str) -> bool:
    """`value.exists()` for a choice element `value[x]`."""
    n = len(prefix)
    found = [k for k in node if len(k) > n and k.startswith(prefix) and k[n].isupper()]
    return any(_exists(node, k) for k in found)


@_twin
def org_1(org: dict[str, Any]) -> bool:
    """org-1: an Organization has a name or an identifier."""
    return _exists(org, "identifier") or _exists(org, "name")


@_twin
def ppc_1(consent: dict[str, Any]) -> bool:
    """ppc-1: a Consent names a policy or a policy rule."""
    return _exists(consent, "policy") or _exists(consent, "policyRule")


def ppc_scope(code: str) -> Predicate:
    """ppc-2…ppc-5: a Consent whose scope has a coding (system 'something', code `code`) names the patient.
    ('something' is the R4 text verbatim: the published invariants can never fire on real codes.)"""

    @_twin
    def ppc(consent: dict[str, Any]) -> bool:
        if _exists(consent, "patient"):
            return True
        scope = _object(consent, "scope")
        codings = _objects(scope, "coding") if scope is not None else []
        return not any(_text(c, "system") == "something" and _text(c, "code") == code for c in codings)

    return ppc


@_twin
def inv_1(task: dict[str, Any]) -> bool:
    """inv-1: a Task's lastModified is not before its authoredOn (compared when of equal precision)."""
    modified, authored = _text(task, "lastModified"), _text(task, "authoredOn")
    if modified is None or authored is None:
        return True
    if len(modified) != len(authored) or modified[-1:] != authored[-1:] or len(modified) not in (10, 20):
        raise _Defer  # other precisions or time zones: fhirpathpy compares them
    return modified >= authored


@_twin
def obs_7(obs: dict[str, Any]) -> bool:
    """obs-7: no component has the Observation's own code when the Observation has a value."""
    if not _exists_any(obs, "value"):
        return True
    code = _object(obs, "code")
    own = {(_text(c, "system"), _text(c, "code")) for c in (_objects(code, "coding") if code else [])}
    for component in _objects(obs, "component"):
        ccode = _object(component, "code")
        for c in _objects(ccode, "coding") if ccode else []:
            if set(c) - {"system", "code", "display"}:
                raise _Defer  # intersect() compares whole codings: other keys, fhirpathpy decides
            if (_text(c, "system"), _text(c, "code")) in own:
                raise _Defer
    return True


def no_home(key: str) -> Predicate:
    """org-2 / org-3: no address / telecom of an Organization has use 'home'."""

    @_twin
    def org(node: dict[str, Any]) -> bool:
        return not any(_text(item, "use") == "home" for item in _objects(node, key))

    return org


@_twin
def qrs_1(item: dict[str, Any]) -> bool:
    """qrs-1: a QuestionnaireResponse item has nested items beneath it or beneath its answers, not both."""
    return not (_exists(item, "answer") and _exists(item, "item"))


@_twin
def gol_1(target: dict[str, Any]) -> bool:
    """gol-1: a Goal target with a detail[x] has a measure."""
    return not _exists_any(target, "detail") or _exists(target, "measure")


_BY_EXPRESSION: Final[dict[str, Predicate]] = {
    "(extension('https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-identity-reliability').extension("
    "'identityStatus').value.exists(code = 'VALI')) implies (identifier.where(system = "
    "'urn:oid:1.2.250.1.213.1.4.8' and use = 'official').exists() or identifier.where(system = "
    "'urn:oid:1.2.250.1.213.1.4.9' and use = 'temp').exists() or identifier.where(system = "
    "'urn:oid:1.2.250.1.213.1.4.10' and use = 'official').exists() or identifier.where(system = "
    "'urn:oid:1.2.250.1.213.1.4.11' and use = 'official').exists())": fr_core_1,
    "(extension('https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-identity-reliability').extension("
    "'identityStatus').value.exists(code = 'VALI')) implies (identifier.where(use = 'official').count() = 1 "
    "or identifier.where(system = 'urn:oid:1.2.250.1.213.1.4.9' and use = 'temp').exists())": fr_core_2,
    "(source.exists() and source.reference.contains('Patient/')) implies extension.where(url="
    "'https://interop.esante.gouv.fr/ig/fhir/tddui/StructureDefinition/tddui-qr-participant').extension.where("
    "url='TDDUIHolder').exists()": auto_eval_porteur,
    "source.reference.contains('Patient/').not() implies (source.reference.contains('Practitioner/') or "
    "author.exists() or extension.where(url='https://interop.esante.gouv.fr/ig/fhir/tddui/StructureDefinition/"
    "tddui-qr-participant').extension.where(url='TDDUIResponsible').exists())": professionnel_requis,
    "(identifier.count() + name.count()) > 0": org_1,
    "policy.exists() or policyRule.exists()": ppc_1,
    **{f"patient.exists() or scope.coding.where(system='something' and code='{code}').exists().not()": ppc_scope(code)
       for code in ("patient-privacy", "research", "adr", "treatment")},
    "lastModified.exists().not() or authoredOn.exists().not() or lastModified >= authoredOn": inv_1,
    "value.empty() or component.code.where(coding.intersect(%resource.code.coding).exists()).empty()": obs_7,
    "telecom.where(use = 'home').empty()": no_home("telecom"),
    "address.where(use = 'home').empty()": no_home("address"),
    "(answer.exists() and item.exists()).not()": qrs_1,
    "(detail.exists() and measure.exists()) or detail.exists().not()": gol_1,
}


def twin(expression: str) -> Predicate | None:
    """The Python twin of a FHIRPath invariant expression, or None (fhirpathpy evaluates it)."""
    found = _BY_EXPRESSION.get(expression)
    if found is not None:
        return found
    simple = _MATCHES.fullmatch(expression)
    return value_matches(simple[1]) if simple else None


def twinned() -> frozenset[str]:
    """The expressions with a hand-written twin (the `value.matches` form is recognised, not listed)."""
    return frozenset(_BY_EXPRESSION)
