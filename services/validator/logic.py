"""Validator decisions: is this payload a TDDUI transaction Bundle Relais can forward?

Pure: no I/O, no awaits. `validate_bundle()` returns every finding as an `Issue` with a stable rule
id and a FHIRPath expression; errors reject the transfer, warnings travel with it.

Base structure comes from the fhir.resources R4B models (R4B is the closest release the library
ships to TDDUI's R4 4.0.1). The Bundle is validated without its entry resources, then each
resource with its own class, so a bad entry is located exactly, every bad entry is reported, and
nothing is parsed twice.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from typing import Any, Final

import orjson
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle
from fhir_core.fhirabstractmodel import FHIRAbstractModel
from pydantic import ValidationError

from services.core.outcome import Issue, error, warning

# Rule ids: stable names carried in each issue's extension; never reuse one for another meaning.
RULE_JSON: Final = "fhir-json"
RULE_NOT_BUNDLE: Final = "fhir-not-bundle"
RULE_STRUCTURE: Final = "fhir-structure"
RULE_RESOURCE_TYPE: Final = "fhir-resource-type"
RULE_TYPE: Final = "tddui-bundle-type"
RULE_REQUEST: Final = "tddui-bundle-entry-request"
RULE_METHOD: Final = "tddui-bundle-request-method"
RULE_RESOURCE: Final = "tddui-bundle-entry-resource"
RULE_FULL_URL: Final = "tddui-bundle-fullurl-unique"
RULE_REQUEST_URL: Final = "tddui-bundle-request-url"
RULE_REF_URN: Final = "tddui-bundle-ref-urn"
RULE_REF_RELATIVE: Final = "tddui-bundle-ref-relative"
RULE_REF_ABSOLUTE: Final = "tddui-bundle-ref-absolute"
RULE_REF_FORMAT: Final = "tddui-bundle-ref-format"

_TYPE_NAME = re.compile(r"[A-Z][A-Za-z]{1,63}")
_RELATIVE = re.compile(r"(?P<type>[A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?")
_TYPE_ID_TAIL = re.compile(r"(?:^|/)(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})\Z")
_HISTORY_TAIL = re.compile(r"/_history/[^/]*\Z")
_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
_ABSTRACT_TYPES = frozenset({"Resource", "DomainResource"})

# What to do about each kind of pydantic error, in words a producer's developer can act on.
_ADVICE: Final[Mapping[str, str]] = {
    "missing": "add this required element",
    "model_field_validation.missing": "add this required element",
    "extra_forbidden": "remove it: FHIR R4 defines no such element here (put local data in an extension)",
    "value_error": "correct the value's format",
    "string_pattern_mismatch": "correct the value's format",
    "base64_decode": "send the attachment data as standard base64",
}
_WRONG_TYPE_ADVICE: Final = "send the JSON type FHIR R4 defines for this element"
_DEFAULT_ADVICE: Final = "correct it to match the FHIR R4 definition of this element"


def validate_bundle(data: bytes | bytearray | memoryview | str | dict[str, Any]) -> list[Issue]:
    """Every issue found in a TDDUI transaction Bundle (raw JSON or already decoded); never raises."""
    bundle, issues = _load(data)
    if bundle is None:
        return issues
    issues.extend(_check_structure(bundle))
    issues.extend(_check_transaction(bundle))
    issues.extend(_check_references(bundle))
    return issues


def reference_targets(bundle: Mapping[str, Any]) -> dict[str, int]:
    """Each string a reference may use to name an entry, mapped to the entry's index.

    The keys are every fullUrl and every `Type/id`, taken from the resource's type and id and
    from the tail of an absolute fullUrl. The first entry wins when two claim the same key.
    """
    targets: dict[str, int] = {}
    for i, entry in _entries(bundle):
        full_url = entry.get("fullUrl")
        if isinstance(full_url, str):
            targets.setdefault(full_url, i)
            tail = _TYPE_ID_TAIL.search(full_url)
            if tail:
                targets.setdefault(f"{tail['type']}/{tail['id']}", i)
        resource = entry.get("resource")
        if isinstance(resource, dict):
            rtype, rid = resource.get("resourceType"), resource.get("id")
            if isinstance(rtype, str) and isinstance(rid, str):
                targets.setdefault(f"{rtype}/{rid}", i)
    return targets


def iter_references(node: Any, path: str) -> Iterator[tuple[str, str]]:
    """(FHIRPath, reference) for every `reference` string under `node`, in document order.

    Walks nested backbone elements, extensions and contained resources alike.
    """
    for chain, element in _walk_objects(node):
        reference = element.get("reference")
        if isinstance(reference, str):
            yield f"{_spell(path, chain)}.reference", reference


@functools.lru_cache(maxsize=512)
def resource_class(name: str) -> type[FHIRAbstractModel] | None:
    """The R4B model class of a concrete resource type such as 'Patient', or None for anything else."""
    if not _TYPE_NAME.fullmatch(name) or name in _ABSTRACT_TYPES:
        return None
    try:
        klass = get_fhir_model_class(name)
    except Exception:  # ValueError for unknown names; stay total whatever the library raises
        return None
    return klass if klass.has_resource_base() and klass.get_resource_type() == name else None


# --- loading ---------------------------------------------------------------------------------------


def _load(data: object) -> tuple[dict[str, Any] | None, list[Issue]]:
    """The decoded Bundle, or None and the issue that says why there is none."""
    if isinstance(data, bytes | bytearray | memoryview | str):
        try:
            data = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            return None, [
                error(
                    "structure",
                    f"The body is not valid JSON ({exc}); send the Bundle as UTF-8 JSON.",
                    "Bundle",
                    rule=RULE_JSON,
                )
            ]
    if not isinstance(data, dict):
        return None, [
            error(
                "structure",
                f"The body is a JSON {_json_kind(data)}; send a FHIR Bundle, a JSON object "
                "whose resourceType is 'Bundle'.",
                "Bundle",
                rule=RULE_NOT_BUNDLE,
            )
        ]
    rtype = data.get("resourceType")
    if rtype != "Bundle":
        found = f"is {_quote(rtype)}" if isinstance(rtype, str) else "is missing"
        return None, [
            error(
                "structure",
                f"resourceType {found}; a TDDUI transfer is a FHIR Bundle of type "
                "'transaction': set resourceType to 'Bundle'.",
                "Bundle.resourceType",
                rule=RULE_NOT_BUNDLE,
            )
        ]
    return data, []


# --- base FHIR structure ---------------------------------------------------------------------------


def _check_structure(bundle: dict[str, Any]) -> list[Issue]:
    """FHIR R4 structure of the Bundle itself, then of each entry resource on its own."""
    entries = bundle.get("entry")
    shell = bundle
    if isinstance(entries, list):
        # The Bundle without its resources: they are validated one by one below.
        shell = {**bundle, "entry": [_without_resource(e) for e in entries]}
    issues = _parse(Bundle, shell, "Bundle")
    for i, entry in _entries(bundle):
        resource = entry.get("resource")
        if resource is not None:
            issues.extend(_check_resource(resource, f"Bundle.entry[{i}].resource"))
    return issues


def _check_resource(resource: object, at: str) -> list[Issue]:
    if not isinstance(resource, dict):
        return [
            error(
                "structure",
                f"{at} is a JSON {_json_kind(resource)}; an entry's resource must be a JSON "
                "object with a resourceType.",
                at,
                rule=RULE_STRUCTURE,
            )
        ]
    rtype = resource.get("resourceType")
    if rtype is None:
        return [
            error(
                "required",
                f"{at} has no resourceType; add the FHIR resource type (e.g. 'Patient').",
                f"{at}.resourceType",
                rule=RULE_RESOURCE_TYPE,
            )
        ]
    if not isinstance(rtype, str):
        return [
            error(
                "structure",
                f"{at}.resourceType must be a string naming a FHIR resource type.",
                f"{at}.resourceType",
                rule=RULE_RESOURCE_TYPE,
            )
        ]
    klass = resource_class(rtype)
    if klass is None:
        return [
            error(
                "not-supported",
                f"{_quote(rtype)} is not a FHIR R4 resource type; use one of the types "
                "the TDDUI Bundle carries (Patient, Encounter, Task, ...).",
                f"{at}.resourceType",
                rule=RULE_RESOURCE_TYPE,
            )
        ]
    return _parse(klass, resource, at)


def _parse(klass: type[FHIRAbstractModel], data: dict[str, Any], at: str) -> list[Issue]:
    """One issue per pydantic error of validating `data` as `klass`, located under `at`."""
    try:
        klass.model_validate(data)
    except ValidationError as exc:
        return [
            _structure_issue(err["loc"], err["type"], err["msg"], at)
            for err in exc.errors(include_url=False, include_input=False)
        ]
    except Exception:  # fhir.resources raises KeyError/TypeError on odd nested resourceTypes
        return _unparseable(data, at)
    return []


def _structure_issue(loc: tuple[int | str, ...], kind: str, msg: str, at: str) -> Issue:
    path = _loc_path(at, loc)
    advice = _ADVICE.get(kind) or (_WRONG_TYPE_ADVICE if kind.endswith("_type") else _DEFAULT_ADVICE)
    msg = msg.removeprefix("Value error, ").rstrip(".")
    if msg.startswith("Value is expected from the instance of"):  # the library names Python types here
        msg, advice = "expected a JSON object", _WRONG_TYPE_ADVICE
    return error("structure", f"{path}: {msg}; {advice}.", path, rule=RULE_STRUCTURE)


def _unparseable(data: dict[str, Any], at: str) -> list[Issue]:
    """Locate the nested resources whose resourceType the models cannot handle."""
    issues = [
        error(
            "not-supported",
            f"{path} is not a FHIR R4 resource type; a nested resource must name a concrete resource type.",
            path,
            rule=RULE_RESOURCE_TYPE,
        )
        for path, rtype in _nested_resource_types(data, at)
        if not (isinstance(rtype, str) and resource_class(rtype))
    ]
    return issues or [
        error(
            "structure",
            f"{at} could not be read as FHIR R4; check its nested resources.",
            at,
            rule=RULE_STRUCTURE,
        )
    ]


def _nested_resource_types(data: dict[str, Any], at: str) -> Iterator[tuple[str, object]]:
    for chain, element in _walk_objects(data):
        if element is not data and "resourceType" in element:
            yield f"{_spell(at, chain)}.resourceType", element["resourceType"]


# --- TDDUIBundle transaction rules -----------------------------------------------------------------


def _check_transaction(bundle: dict[str, Any]) -> list[Issue]:
    issues: list[Issue] = []
    btype = bundle.get("type")
    if isinstance(btype, str) and btype != "transaction":  # a missing type is a structure error already
        issues.append(
            error(
                "value",
                f"Bundle.type is {_quote(btype)}; a TDDUI transfer must be a Bundle of type "
                "'transaction': set type to 'transaction'.",
                "Bundle.type",
                rule=RULE_TYPE,
            )
        )
    for i, entry in _entries(bundle):
        issues.extend(_check_entry(entry, f"Bundle.entry[{i}]"))
    issues.extend(_check_full_urls(bundle))
    return issues


def _check_entry(entry: dict[str, Any], at: str) -> list[Issue]:
    issues: list[Issue] = []
    resource = entry.get("resource")
    if resource is None:
        issues.append(
            error(
                "required",
                f"{at} has no resource; every TDDUI entry carries the resource to create.",
                f"{at}.resource",
                rule=RULE_RESOURCE,
            )
        )
    request = entry.get("request")
    if request is None:
        issues.append(
            error(
                "required",
                f"{at} has no request; add request with method 'POST' and url set to the resource type.",
                f"{at}.request",
                rule=RULE_REQUEST,
            )
        )
        return issues
    if not isinstance(request, dict):
        return issues  # reported by the structure check
    method = request.get("method")
    if isinstance(method, str) and method != "POST":
        issues.append(
            error(
                "value",
                f"request.method is {_quote(method)}; TDDUI only creates resources: use 'POST'.",
                f"{at}.request.method",
                rule=RULE_METHOD,
            )
        )
    rtype = resource.get("resourceType") if isinstance(resource, dict) else None
    url = request.get("url")
    if isinstance(url, str) and isinstance(rtype, str) and url != rtype and resource_class(rtype):
        issues.append(_request_url_issue(url, rtype, f"{at}.request.url"))
    return issues


def _request_url_issue(url: str, rtype: str, at: str) -> Issue:
    what = "names another resource type" if resource_class(url) else "is not a resource type"
    return warning(
        "value",
        f"request.url {_quote(url)} {what}; a create must POST to {_quote(rtype)} — Relais "
        "repairs this before delivery.",
        at,
        rule=RULE_REQUEST_URL,
    )


def _check_full_urls(bundle: dict[str, Any]) -> list[Issue]:
    issues: list[Issue] = []
    first: dict[str, int] = {}
    for i, entry in _entries(bundle):
        full_url = entry.get("fullUrl")
        if not isinstance(full_url, str):
            continue
        j = first.setdefault(full_url, i)
        if j != i:
            issues.append(
                error(
                    "invalid",
                    f"fullUrl {_quote(full_url)} is also the fullUrl of Bundle.entry[{j}]; "
                    "give every entry its own fullUrl (e.g. a fresh urn:uuid).",
                    f"Bundle.entry[{i}].fullUrl",
                    rule=RULE_FULL_URL,
                )
            )
    return issues


# --- references ------------------------------------------------------------------------------------


def _check_references(bundle: dict[str, Any]) -> list[Issue]:
    targets = reference_targets(bundle)
    issues: list[Issue] = []
    for i, entry in _entries(bundle):
        resource = entry.get("resource")
        if not isinstance(resource, dict):
            continue
        for path, reference in iter_references(resource, f"Bundle.entry[{i}].resource"):
            issue = _resolve(reference, path, targets)
            if issue is not None:
                issues.append(issue)
    return issues


def _resolve(reference: str, at: str, targets: Mapping[str, int]) -> Issue | None:
    """None when the reference resolves (or needs no resolving), else the issue saying why not."""
    if not reference or reference.startswith("#"):
        return None  # empty is a structure error; '#id' points into contained resources
    shown = _quote(reference)
    if reference.startswith(("urn:uuid:", "urn:oid:")):
        if reference in targets:
            return None
        return error(
            "not-found",
            f"{at} is {shown}, the fullUrl of no entry in this Bundle; add the referenced "
            "resource to the Bundle or correct the reference.",
            at,
            rule=RULE_REF_URN,
        )
    relative = _RELATIVE.fullmatch(reference)
    if relative and resource_class(relative["type"]):
        if f"{relative['type']}/{relative['id']}" in targets:
            return None
        return warning(
            "not-found",
            f"{at} is {shown}, which names no entry of this Bundle; it resolves only if "
            "the receiving system already holds that resource. Add it to the Bundle if it belongs to "
            "this transfer.",
            at,
            rule=RULE_REF_RELATIVE,
        )
    if _URI_SCHEME.match(reference):
        if reference in targets or _HISTORY_TAIL.sub("", reference) in targets:
            return None
        return warning(
            "not-found",
            f"{at} is {shown}, an absolute URL that is the fullUrl of no entry; it resolves "
            "only if that server holds the resource. Use the entry's fullUrl if it is in this Bundle.",
            at,
            rule=RULE_REF_ABSOLUTE,
        )
    return error(
        "value",
        f"{at} is {shown}, which is not a literal reference; use an entry's fullUrl "
        "(urn:uuid:...), a relative 'ResourceType/id' or an absolute URL.",
        at,
        rule=RULE_REF_FORMAT,
    )


# --- helpers ---------------------------------------------------------------------------------------


# A location as a chain of (parent, segment) links, spelled out only when an issue needs it: building
# every node's full path eagerly costs O(depth²), which hostile nesting would turn into a CPU sink.
_Chain = tuple[Any, str] | None


def _walk_objects(node: Any) -> Iterator[tuple[_Chain, dict[str, Any]]]:
    """(location chain, object) for every JSON object under and including `node`, in document order.

    Iterative, so hostile nesting cannot exhaust the stack.
    """
    stack: list[tuple[Any, _Chain]] = [(node, None)]
    while stack:
        current, chain = stack.pop()
        if isinstance(current, dict):
            yield chain, current
            children = [
                (v, (chain, f".{_element_name(k)}")) for k, v in current.items() if isinstance(v, dict | list)
            ]
        elif isinstance(current, list):
            children = [(v, (chain, f"[{i}]")) for i, v in enumerate(current) if isinstance(v, dict | list)]
        else:
            continue
        stack.extend(reversed(children))


def _spell(path: str, chain: _Chain) -> str:
    segments = []
    while chain is not None:
        chain, segment = chain
        segments.append(segment)
    return path + "".join(reversed(segments))


def _entries(bundle: Mapping[str, Any]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(index, entry) for each entry that is a JSON object; the structure check reports the others."""
    entries = bundle.get("entry")
    if isinstance(entries, list):
        for i, entry in enumerate(entries):
            if isinstance(entry, dict):
                yield i, entry


def _without_resource(entry: object) -> object:
    if isinstance(entry, dict) and "resource" in entry:
        return {k: v for k, v in entry.items() if k != "resource"}
    return entry


def _loc_path(at: str, loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as FHIRPath: ('identifier', 0, 'system') → at.identifier[0].system."""
    parts = [at]
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item == "resource_type":
            parts.append(".resourceType")
        elif item and item != "root":  # 'root' marks the model itself, not an element
            parts.append(f".{_element_name(item)}")
    return "".join(parts)


def _element_name(key: str) -> str:
    # JSON '_birthDate' holds the id/extensions of primitive 'birthDate'; FHIRPath names it 'birthDate'.
    return key[1:] if key.startswith("_") and len(key) > 1 else key


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


def _quote(value: str, limit: int = 80) -> str:
    """A producer-supplied string for a diagnostic, quoted and cut short."""
    return repr(value if len(value) <= limit else value[:limit] + "…")
