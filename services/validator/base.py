"""Base FHIR R4 structure, by the fhir.resources R4B models (the closest release the library ships).

The Bundle is validated without its entry resources, then each resource with its own class, so a
bad entry is located exactly, every bad entry is reported, and nothing is parsed twice.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from typing import Any, Final

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle
from fhir_core.fhirabstractmodel import FHIRAbstractModel
from pydantic import ValidationError

from services.core.outcome import Issue, error
from services.validator.jsonwalk import entries, loc_path, spell, walk_objects
from services.validator.messages import json_kind, quote, say
from services.validator.prescreen import surely_valid

RULE_STRUCTURE: Final = "fhir-structure"
RULE_RESOURCE_TYPE: Final = "fhir-resource-type"

_TYPE_NAME = re.compile(r"[A-Z][A-Za-z]{1,63}")
_ABSTRACT_TYPES = frozenset({"Resource", "DomainResource"})

# What to do about each kind of pydantic error, in words a producer's developer can act on.
_ADVICE: Final[Mapping[str, tuple[str, str]]] = {
    "missing": ("add this required element", "ajoutez cet élément obligatoire"),
    "model_field_validation.missing": ("add this required element", "ajoutez cet élément obligatoire"),
    "extra_forbidden": (
        "remove it: FHIR R4 defines no such element here (put local data in an extension)",
        "supprimez-le : FHIR R4 ne définit pas cet élément ici (mettez les données locales dans une extension)",
    ),
    "value_error": ("correct the value's format", "corrigez le format de la valeur"),
    "string_pattern_mismatch": ("correct the value's format", "corrigez le format de la valeur"),
    "base64_decode": ("send the attachment data as standard base64", "envoyez les données en base64 standard"),
}
_WRONG_TYPE_ADVICE: Final = (
    "send the JSON type FHIR R4 defines for this element",
    "envoyez le type JSON que FHIR R4 définit pour cet élément",
)
_DEFAULT_ADVICE: Final = (
    "correct it to match the FHIR R4 definition of this element",
    "corrigez-le selon la définition FHIR R4 de cet élément",
)


@functools.lru_cache(maxsize=512)
def resource_class(name: str) -> type[FHIRAbstractModel] | None:
    """The R4B model class of a concrete resource type such as 'Patient', or None for anything else."""
    if not _TYPE_NAME.fullmatch(name) or name in _ABSTRACT_TYPES:
        return None
    try:
        klass = get_fhir_model_class(name)
    except Exception:  # noqa: BLE001 - ValueError for unknown names; stay total whatever the library raises
        return None
    return klass if klass.has_resource_base() and klass.get_resource_type() == name else None


def check_structure(bundle: dict[str, Any], lang: str = "en") -> list[Issue]:
    """FHIR R4 structure of the Bundle itself, then of each entry resource on its own."""
    found = bundle.get("entry")
    shell = bundle
    if isinstance(found, list):
        # The Bundle without its resources: they are validated one by one below.
        shell = {**bundle, "entry": [_without_resource(e) for e in found]}
    issues = parse(Bundle, shell, "Bundle", lang)
    for i, entry in entries(bundle):
        resource = entry.get("resource")
        if resource is not None:
            issues.extend(check_resource(resource, f"Bundle.entry[{i}].resource", lang))
    return issues


def check_resource(resource: object, at: str, lang: str = "en") -> list[Issue]:
    """Base structure of one resource, located under `at`."""
    if not isinstance(resource, dict):
        return [error("structure", say(lang, "resource-not-object", at=at, kind=json_kind(resource, lang)),
                      at, rule=RULE_STRUCTURE)]
    rtype = resource.get("resourceType")
    if rtype is None:
        return [error("required", say(lang, "resource-type-missing", at=at), f"{at}.resourceType",
                      rule=RULE_RESOURCE_TYPE)]
    if not isinstance(rtype, str):
        return [error("structure", say(lang, "resource-type-not-string", at=at), f"{at}.resourceType",
                      rule=RULE_RESOURCE_TYPE)]
    klass = resource_class(rtype)
    if klass is None:
        return [error("not-supported", say(lang, "resource-type-unknown", rtype=quote(rtype)),
                      f"{at}.resourceType", rule=RULE_RESOURCE_TYPE)]
    return parse(klass, resource, at, lang)


def parse(klass: type[FHIRAbstractModel], data: dict[str, Any], at: str, lang: str = "en") -> list[Issue]:
    """One issue per pydantic error of validating `data` as `klass`, located under `at`.

    The models run only when the prescreen cannot prove they would find nothing (prescreen.py): the
    findings are theirs either way, and a valid resource costs a walk instead of a model build.
    """
    if surely_valid(klass, data):
        return []
    try:
        klass.model_validate(data)
    except ValidationError as exc:
        return [
            _structure_issue(err["loc"], err["type"], err["msg"], at, lang)
            for err in exc.errors(include_url=False, include_input=False)
        ]
    except Exception:  # noqa: BLE001 - fhir.resources raises KeyError/TypeError on odd nested resourceTypes
        return _unparseable(data, at, lang)
    return []


def _structure_issue(loc: tuple[int | str, ...], kind: str, msg: str, at: str, lang: str) -> Issue:
    path = loc_path(at, loc)
    advice = _ADVICE.get(kind) or (_WRONG_TYPE_ADVICE if kind.endswith("_type") else _DEFAULT_ADVICE)
    msg = msg.removeprefix("Value error, ").rstrip(".")
    if msg.startswith("Value is expected from the instance of"):  # the library names Python types here
        msg, advice = "expected a JSON object", _WRONG_TYPE_ADVICE
    text = say(lang, "structure", path=path, msg=msg, advice=advice[1 if lang == "fr" else 0])
    return error("structure", text, path, rule=RULE_STRUCTURE)


def _unparseable(data: dict[str, Any], at: str, lang: str) -> list[Issue]:
    """Locate the nested resources whose resourceType the models cannot handle."""
    issues = [
        error("not-supported", say(lang, "nested-type-unknown", path=path), path, rule=RULE_RESOURCE_TYPE)
        for path, rtype in _nested_resource_types(data, at)
        if not (isinstance(rtype, str) and resource_class(rtype))
    ]
    return issues or [error("structure", say(lang, "unreadable", at=at), at, rule=RULE_STRUCTURE)]


def _nested_resource_types(data: dict[str, Any], at: str) -> Iterator[tuple[str, object]]:
    for chain, element in walk_objects(data):
        if element is not data and "resourceType" in element:
            yield f"{spell(at, chain)}.resourceType", element["resourceType"]


def _without_resource(entry: object) -> object:
    if isinstance(entry, dict) and "resource" in entry:
        return {k: v for k, v in entry.items() if k != "resource"}
    return entry
