"""TDDUIBundle transaction rules (type, request, POST, unique fullUrl), the Bundle's own FHIR R4 rules
(the invariants bdl-1…bdl-12, the fullUrl formats), and intra-Bundle references."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Mapping
from typing import Any, Final

import orjson

from services.core.outcome import Issue, error, warning
from services.validator.base import resource_class
from services.validator.jsonwalk import entries, spell, walk_objects
from services.validator.messages import quote, say

RULE_TYPE: Final = "tddui-bundle-type"
RULE_REQUEST: Final = "tddui-bundle-entry-request"
RULE_METHOD: Final = "tddui-bundle-request-method"
RULE_RESOURCE: Final = "tddui-bundle-entry-resource"
RULE_FULL_URL: Final = "tddui-bundle-fullurl-unique"
RULE_REQUEST_URL: Final = "tddui-bundle-request-url"
RULE_REF_URN: Final = "tddui-bundle-ref-urn"
RULE_REF_RELATIVE: Final = "tddui-bundle-ref-relative"
RULE_REF_ABSOLUTE: Final = "tddui-bundle-ref-absolute"
RULE_REF_PORTABLE: Final = "tddui-bundle-ref-portable"
RULE_REF_FORMAT: Final = "tddui-bundle-ref-format"

_RELATIVE = re.compile(r"(?P<type>[A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?")
_TYPE_ID_TAIL = re.compile(r"(?:^|/)(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})\Z")
_HISTORY_TAIL = re.compile(r"/_history/[^/]*\Z")
_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
_UUID = re.compile(r"urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_OID = re.compile(r"urn:oid:[0-2](\.(0|[1-9][0-9]*))+")
_RESTFUL = re.compile(r"(?P<base>https?://.+/)?(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})"
                      r"(?:/_history/[A-Za-z0-9\-.]{1,64})?")

RULE_FULL_URL_ABSOLUTE: Final = "fhir-r4/Bundle/fullurl-absolute"
RULE_FULL_URL_FORMAT: Final = "fhir-r4/Bundle/fullurl-format"
RULE_FULL_URL_RESOURCE: Final = "fhir-r4/Bundle/fullurl-resource"
_REQUEST_TYPES: Final = frozenset({"batch", "transaction", "history"})
_RESPONSE_TYPES: Final = frozenset({"batch-response", "transaction-response", "history"})


def reference_targets(bundle: Mapping[str, Any]) -> dict[str, int]:
    """Each string a reference may use to name an entry, mapped to the entry's index.

    The keys are every fullUrl and every `Type/id`, taken from the resource's type and id and
    from the tail of an absolute fullUrl. The first entry wins when two claim the same key.
    """
    targets: dict[str, int] = {}
    for i, entry in entries(bundle):
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
    for chain, element in walk_objects(node):
        reference = element.get("reference")
        if isinstance(reference, str):
            yield f"{spell(path, chain)}.reference", reference


def check_transaction(bundle: dict[str, Any], lang: str = "en") -> list[Issue]:
    """Bundle.type, each entry's resource and request, unique fullUrls."""
    issues: list[Issue] = []
    btype = bundle.get("type")
    if isinstance(btype, str) and btype != "transaction":  # a missing type is a structure error already
        issues.append(error("value", say(lang, "bundle-type", value=quote(btype)), "Bundle.type", rule=RULE_TYPE))
    for i, entry in entries(bundle):
        issues.extend(_check_entry(entry, f"Bundle.entry[{i}]", lang))
    issues.extend(_check_full_urls(bundle, lang))
    return issues


def _check_entry(entry: dict[str, Any], at: str, lang: str) -> list[Issue]:
    issues: list[Issue] = []
    resource = entry.get("resource")
    if resource is None:
        issues.append(error("required", say(lang, "entry-resource", at=at), f"{at}.resource", rule=RULE_RESOURCE))
    request = entry.get("request")
    if request is None:
        issues.append(error("required", say(lang, "entry-request", at=at), f"{at}.request", rule=RULE_REQUEST))
        return issues
    if not isinstance(request, dict):
        return issues  # reported by the structure check
    method = request.get("method")
    if isinstance(method, str) and method != "POST":
        issues.append(error("value", say(lang, "request-method", value=quote(method)), f"{at}.request.method",
                            rule=RULE_METHOD))
    rtype = resource.get("resourceType") if isinstance(resource, dict) else None
    url = request.get("url")
    if isinstance(url, str) and isinstance(rtype, str) and url != rtype and resource_class(rtype):
        what = say(lang, "url-other-type" if resource_class(url) else "url-not-type")
        issues.append(warning("value", say(lang, "request-url", url=quote(url), what=what, rtype=quote(rtype)),
                              f"{at}.request.url", rule=RULE_REQUEST_URL))
    return issues


def _check_full_urls(bundle: dict[str, Any], lang: str) -> list[Issue]:
    """bdl-7: a fullUrl is unique, unless the entries sharing it carry different meta.versionIds (two
    versions of one resource); a history Bundle is exempt."""
    issues: list[Issue] = []
    if bundle.get("type") == "history":
        return issues
    first: dict[tuple[str, object], int] = {}
    for i, entry in entries(bundle):
        full_url = entry.get("fullUrl")
        if not isinstance(full_url, str):
            continue
        j = first.setdefault((full_url, _version_id(entry.get("resource"))), i)
        if j != i:
            issues.append(error("invalid", say(lang, "fullurl-unique", url=quote(full_url), other=j),
                                f"Bundle.entry[{i}].fullUrl", rule=RULE_FULL_URL))
    return issues


def _version_id(resource: object) -> object:
    """The resource's meta.versionId (None when absent; FHIRPath's `&` makes an empty one '')."""
    meta = resource.get("meta") if isinstance(resource, dict) else None
    version = meta.get("versionId") if isinstance(meta, dict) else None
    return None if version == "" else version


def check_bundle_r4(bundle: dict[str, Any], lang: str = "en") -> list[Issue]:
    """The Bundle invariants of FHIR R4 (bdl-1…bdl-12, texts in fhir-r4-base.yaml) and the fullUrl rules.

    bdl-7 (unique fullUrl) is `tddui-bundle-fullurl-unique` above; bdl-3's "request required in a
    transaction" is `tddui-bundle-entry-request`; what is left of them is checked here.
    """
    from services.validator.r4 import invariants  # the R4 texts (r4.py imports nothing from here)

    out: list[Issue] = []
    texts = invariants()

    def broken(key: str, at: str) -> None:
        out.append(error("invariant", say(lang, "invariant", at=at, key=key, human=texts[key][0],
                                          profile="FHIR R4 Bundle"), at, rule=f"fhir-r4/Bundle/inv/{key}"))

    btype = bundle.get("type")
    btype = btype if isinstance(btype, str) else None  # another JSON type: a structure error already
    if bundle.get("total") is not None and btype not in ("searchset", "history"):
        broken("bdl-1", "Bundle.total")
    if btype == "document":
        ident = bundle.get("identifier")
        if not (isinstance(ident, dict) and ident.get("system") and ident.get("value")):
            broken("bdl-9", "Bundle")
        if not isinstance(bundle.get("timestamp"), str):
            broken("bdl-10", "Bundle")
    first = True
    for i, entry in entries(bundle):
        at = f"Bundle.entry[{i}]"
        resource = entry.get("resource")
        if first and btype in ("document", "message"):
            wanted = "Composition" if btype == "document" else "MessageHeader"
            if not (isinstance(resource, dict) and resource.get("resourceType") == wanted):
                broken("bdl-11" if btype == "document" else "bdl-12", "Bundle")
        first = False
        if entry.get("search") is not None and btype != "searchset":
            broken("bdl-2", f"{at}.search")
        if entry.get("request") is not None and btype not in _REQUEST_TYPES:
            broken("bdl-3", f"{at}.request")
        if entry.get("response") is not None and btype not in _RESPONSE_TYPES:
            broken("bdl-4", f"{at}.response")
        if resource is None and entry.get("request") is None and entry.get("response") is None:
            broken("bdl-5", at)
        full_url = entry.get("fullUrl")
        if isinstance(full_url, str):
            if "/_history/" in full_url:
                broken("bdl-8", f"{at}.fullUrl")
            out.extend(_full_url(full_url, resource, f"{at}.fullUrl", lang))
    return out


def _full_url(full_url: str, resource: object, at: str, lang: str) -> list[Issue]:
    """A fullUrl is absolute; a urn is well formed; a RESTful URL names the resource's type and id."""
    shown = quote(full_url)
    if full_url.startswith("urn:uuid:") or full_url.startswith("urn:oid:"):
        if _UUID.fullmatch(full_url) or _OID.fullmatch(full_url):
            return []
        kind = "urn:uuid: + a lower-case UUID" if full_url.startswith("urn:uuid:") else "urn:oid: + an OID"
        return [error("value", say(lang, "fullurl-format", at=at, url=shown, kind=kind), at,
                      rule=RULE_FULL_URL_FORMAT)]
    if not _URI_SCHEME.match(full_url):
        return [error("value", say(lang, "fullurl-absolute", at=at, url=shown), at, rule=RULE_FULL_URL_ABSOLUTE)]
    restful = _RESTFUL.fullmatch(full_url)
    if restful is None or not restful["base"] or not isinstance(resource, dict):
        return []
    rtype, rid = resource.get("resourceType"), resource.get("id")
    if not isinstance(rtype, str) or not resource_class(restful["type"]):
        return []
    if restful["type"] != rtype or restful["id"] != rid:  # no id at all cannot match either
        return [error("value", say(lang, "fullurl-resource", at=at, url=shown, rtype=rtype,
                                   rid=quote(rid) if isinstance(rid, str) else "none"), at,
                      rule=RULE_FULL_URL_RESOURCE)]
    return []


def check_references(bundle: dict[str, Any], targets: Mapping[str, int], lang: str = "en",
                     references: list[object] | None = None) -> list[Issue]:
    """Every reference of every entry resolves in the Bundle (or says why it may not).

    `references` is `all_references(bundle)` when the caller already walked the Bundle for it.
    """
    refs = all_references(bundle) if references is None else references
    if all(_resolves(r, targets) for r in refs):
        return []  # the usual case, found without spelling a single location
    issues: list[Issue] = []
    for i, entry in entries(bundle):
        resource = entry.get("resource")
        if not isinstance(resource, dict):
            continue
        for path, reference in iter_references(resource, f"Bundle.entry[{i}].resource"):
            issue = _resolve(reference, path, targets, lang)
            if issue is not None:
                issues.append(issue)
    return issues


def check_portable_references(bundle: dict[str, Any], targets: Mapping[str, int], lang: str = "en",
                              references: list[object] | None = None) -> list[Issue]:
    """One warning when entries link to each other other than by `urn:uuid:` fullUrls.

    The IG allows absolute fullUrls and `Type/id`, but FHIR servers differ on rewriting them in a
    transaction (some store them as sent, pointing at nothing); Relais rewrites them before delivery.
    """
    refs = all_references(bundle) if references is None else references
    if all(not isinstance(r, str) or r.startswith(("urn:", "#")) for r in refs):
        return []  # the usual case: every link is already a urn (or points into contained resources)
    for i, entry in entries(bundle):
        resource = entry.get("resource")
        if not isinstance(resource, dict):
            continue
        for path, reference in iter_references(resource, f"Bundle.entry[{i}].resource"):
            if reference.startswith(("urn:", "#")) or not _names_an_entry(reference, targets):
                continue
            return [warning("value", say(lang, "ref-portable", at=path, ref=quote(reference)), path,
                            rule=RULE_REF_PORTABLE)]
    return []


def _names_an_entry(reference: str, targets: Mapping[str, int]) -> bool:
    if reference in targets or _HISTORY_TAIL.sub("", reference) in targets:
        return True
    relative = _RELATIVE.fullmatch(reference)
    return bool(relative) and f"{relative['type']}/{relative['id']}" in targets  # type: ignore[index]


def all_references(bundle: dict[str, Any]) -> list[object]:
    """Every string `reference` value in the entries' resources (one pass, shared by the reference checks).

    Found in the resources' compact JSON rather than by walking them (a fifth of the cost): there a key is
    the only string that follows `{` or `,`, since a quote inside a string is always escaped. Values of
    other JSON types are left out: both checks pass over them (the structure check reports them).
    """
    resources = [e.get("resource") for _, e in entries(bundle)]
    try:
        text = orjson.dumps(resources)
    except orjson.JSONEncodeError:  # a caller's dict that is not JSON, or nested past orjson's limit
        return [r for r in _all_references(resources) if isinstance(r, str)]
    pieces = text.split(_REFERENCE_KEY)
    found: list[object] = []
    for before, after in itertools.pairwise(pieces):
        if before[-1:] not in (b"{", b","):
            continue  # the tail of a longer key, such as "x\"reference"
        end = after.find(b'"')
        value = after[:end]
        if b"\\" in value:  # an escape: the closing quote is the first one not escaped
            tail = _STRING_TAIL.match(after)
            found.append(orjson.loads(b'"' + tail[1] + b'"') if tail else None)
        else:
            found.append(value.decode())
    return found


_REFERENCE_KEY: Final = b'"reference":"'
_STRING_TAIL: Final = re.compile(rb'((?:[^"\\]|\\.)*)"')


def _all_references(resources: list[Any]) -> Iterator[object]:
    """Every `reference` value under `resources`, locations not kept (iterative: no recursion limit)."""
    stack: list[Any] = list(resources)
    pop, push = stack.pop, stack.append
    while stack:
        current = pop()
        if isinstance(current, dict):
            if "reference" in current:
                yield current["reference"]
            values: Any = current.values()
        elif isinstance(current, list):
            values = current
        else:
            continue
        for v in values:
            if isinstance(v, dict | list):
                push(v)


def _resolves(reference: object, targets: Mapping[str, int]) -> bool:
    """True when `_resolve` finds nothing to say (quick check, same decisions, no issue built)."""
    if not isinstance(reference, str) or not reference or reference.startswith("#"):
        return True  # not a string: iter_references skips it; empty or '#id': nothing to resolve
    if reference.startswith(("urn:uuid:", "urn:oid:")):
        return reference in targets
    relative = _RELATIVE.fullmatch(reference)
    if relative and resource_class(relative["type"]):
        return f"{relative['type']}/{relative['id']}" in targets
    # Absolute URLs found as such; a history tail or a bad format: the located pass decides.
    return bool(_URI_SCHEME.match(reference)) and reference in targets


def _resolve(reference: str, at: str, targets: Mapping[str, int], lang: str) -> Issue | None:
    """None when the reference resolves (or needs no resolving), else the issue saying why not."""
    if not reference or reference.startswith("#"):
        return None  # empty is a structure error; '#id' points into contained resources
    shown = quote(reference)
    if reference.startswith(("urn:uuid:", "urn:oid:")):
        if reference in targets:
            return None
        return error("not-found", say(lang, "ref-urn", at=at, ref=shown), at, rule=RULE_REF_URN)
    relative = _RELATIVE.fullmatch(reference)
    if relative and resource_class(relative["type"]):
        if f"{relative['type']}/{relative['id']}" in targets:
            return None
        return warning("not-found", say(lang, "ref-relative", at=at, ref=shown), at, rule=RULE_REF_RELATIVE)
    if _URI_SCHEME.match(reference):
        if reference in targets or _HISTORY_TAIL.sub("", reference) in targets:
            return None
        return warning("not-found", say(lang, "ref-absolute", at=at, ref=shown), at, rule=RULE_REF_ABSOLUTE)
    return error("value", say(lang, "ref-format", at=at, ref=shown), at, rule=RULE_REF_FORMAT)


def resolve_key(reference: str) -> str:
    """The key `reference_targets` uses for a reference: without any `/_history/n` tail."""
    return _HISTORY_TAIL.sub("", reference)
