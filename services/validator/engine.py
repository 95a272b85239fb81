"""The profile pass: which TDDUI profile each entry claims or matches, then every rule of that profile.

Entries that claim a TDDUI profile in `meta.profile` are checked against it. Entries that claim
none are tried against every Bundle slice of their resource type (the slicing is by profile, so
an entry "counts" for a slice only if it passes it): no match is an error that carries the closest
candidate's findings; several matches is a warning asking for `meta.profile`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from services.core.outcome import Issue
from services.validator.checks import Context
from services.validator.compiler import Profile
from services.validator.messages import quote, say
from services.validator.ruleset import RuleSet

RULE_PROFILE_UNKNOWN = "tddui-bundle/profile-unknown"
RULE_PROFILE_TYPE = "tddui-bundle/profile-type"
RULE_PROFILE_VERSION = "tddui-bundle/profile-version"
RULE_SLICE_NONE = "tddui-bundle/slice-none"
RULE_SLICE_SEVERAL = "tddui-bundle/slice-several"
RULE_SLICE_UNPROFILED = "tddui-bundle/slice-unprofiled"

Entry = tuple[int, dict[str, Any]]  # (index in Bundle.entry, resource)


def check_profiles(rs: RuleSet, entries: list[Entry], targets: Mapping[str, int], lang: str) -> list[Issue]:
    """Every profile finding for the entries (index, resource) of one Bundle."""
    out: list[Issue] = []
    claimed: dict[int, list[Profile]] = {}
    unclaimed: list[Entry] = []
    for i, resource in entries:
        profiles = _claims(rs, i, resource, lang, out)
        if profiles is None:
            unclaimed.append((i, resource))
        else:
            claimed[i] = profiles
    conform: dict[int, frozenset[str]] = {i: frozenset(p.url for p in ps) for i, ps in claimed.items()}
    types = {i: r.get("resourceType") for i, r in entries}

    def resolve(reference: object) -> tuple[str, frozenset[str]] | None:
        if not isinstance(reference, str):
            return None
        j = targets.get(reference)
        if j is None:
            j = targets.get(reference.split("/_history/", 1)[0])
        rtype = types.get(j) if j is not None else None
        if not isinstance(rtype, str):
            return None
        return rtype, conform.get(j, frozenset())  # type: ignore[arg-type]

    # Slice matching first, so references to unclaimed entries know which profile they conform to.
    matched: dict[int, list[Profile]] = {}
    for i, resource in unclaimed:
        found = _match(rs, i, resource, lang, resolve, out)
        matched[i] = found
        conform[i] = frozenset(p.url for p in found)
    for i, resource in entries:
        at = f"Bundle.entry[{i}].resource"
        ctx = Context(lang, resolve, out=out)
        rtype = resource.get("resourceType")
        for check in rs.base.get(rtype, ()) if isinstance(rtype, str) else ():
            ctx.profile_id, ctx.profile_url = f"FHIR R4 {rtype}", None
            check.run(resource, at, ctx)
        for profile in claimed.get(i) or matched.get(i) or ():
            profile.run(resource, at, ctx)
    return out


def _claims(rs: RuleSet, i: int, resource: dict[str, Any], lang: str, out: list[Issue]) -> list[Profile] | None:
    """The TDDUI profiles the resource claims (None: it claims none, so slices are tried)."""
    meta = resource.get("meta")
    urls = meta.get("profile") if isinstance(meta, dict) else None
    if not isinstance(urls, list):
        return None
    found: list[Profile] = []
    any_tddui = False
    for k, raw in enumerate(urls):
        if not isinstance(raw, str):
            continue
        url, _, version = raw.partition("|")
        at = f"Bundle.entry[{i}].resource.meta.profile[{k}]"
        if not url.startswith(rs.namespace):
            continue  # FR Core or other profiles: not ours to judge
        any_tddui = True
        profile = rs.profiles.get(url)
        if profile is None:
            out.append(Issue("error", "not-supported",
                             say(lang, "profile-unknown", at=at, url=quote(raw), version=rs.ig_version,
                                 count=len(rs.profiles)), (at,), RULE_PROFILE_UNKNOWN, rs.bundle_url))
            continue
        if profile.resource_type != resource.get("resourceType"):
            out.append(Issue("error", "invalid",
                             say(lang, "profile-type", at=at, url=quote(raw), expected=profile.resource_type,
                                 rtype=quote(resource.get("resourceType"))), (at,), RULE_PROFILE_TYPE,
                             rs.bundle_url))
            continue
        if version and version not in rs.accepted_versions:
            out.append(Issue("warning", "business-rule",
                             say(lang, "profile-version", at=at, url=quote(raw), version=rs.ig_version),
                             (at,), RULE_PROFILE_VERSION, profile.url))
        if profile not in found:
            found.append(profile)
    return found if any_tddui else None


def _match(rs: RuleSet, i: int, resource: dict[str, Any], lang: str, resolve: Any,
           out: list[Issue]) -> list[Profile]:
    at = f"Bundle.entry[{i}].resource"
    rtype = resource.get("resourceType")
    candidates = rs.by_type.get(rtype, []) if isinstance(rtype, str) else []
    if not candidates:
        if isinstance(rtype, str):
            out.append(Issue("warning", "informational", say(lang, "slice-unprofiled", at=at, rtype=rtype),
                             (at,), RULE_SLICE_UNPROFILED, rs.bundle_url))
        return []
    results: list[tuple[Profile, list[Issue]]] = []
    for profile in candidates:
        ctx = Context(lang, resolve, matching=True)
        profile.run(resource, at, ctx)
        results.append((profile, [x for x in ctx.out if x.is_error]))
    passing = [p for p, errors in results if not errors]
    names = ", ".join(f"{p.slice_name} ({p.id})" for p in candidates)
    if not passing:
        best, errors = min(results, key=lambda r: len(r[1]))
        out.append(Issue("error", "invalid",
                         say(lang, "slice-none", at=at, rtype=rtype, slices=names, best=best.id,
                             count=len(errors)), (at,), RULE_SLICE_NONE, rs.bundle_url))
        return [best]  # its findings are reported by the main pass, so the vendor sees what to fix
    if len(passing) > 1:
        shown = ", ".join(f"{p.slice_name} ({p.id})" for p in passing)
        out.append(Issue("warning", "business-rule", say(lang, "slice-several", at=at, rtype=rtype, slices=shown),
                         (at,), RULE_SLICE_SEVERAL, rs.bundle_url))
    return passing


def profiled_entries(bundle: Mapping[str, Any]) -> Iterator[Entry]:
    """(index, resource) of each entry whose resource is a JSON object."""
    entries = bundle.get("entry")
    if isinstance(entries, list):
        for i, entry in enumerate(entries):
            if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
                yield i, entry["resource"]
