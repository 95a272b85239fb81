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
