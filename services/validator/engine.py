"""The profile pass: which TDDUI profile each entry claims or matches, then every rule of that profile.

TDDUI's Bundle slicing is *open* (tddui-profiles.md §4 notes, §11.10): an entry that fills no slice
is not rejected by the profile. So:
* an entry that claims a TDDUI profile in `meta.profile` is checked against it; when that profile is
  no Bundle slice (the official Task example claims `tddui-task-transport`, the transport profiles'
  parent) it is still checked against it if Relais knows it, and a warning says it fills no slice;
  an unknown TDDUI profile is a warning and the entry is checked against base FHIR R4 only;
* an entry that claims none is tried against every slice of its resource type (the slicing is by
  profile, so it "counts" for a slice only if it passes it); matching none is a warning naming the
  closest slice and its first finding, and no rule of a profile the entry never claimed is reported
  as its error; several matches is a warning asking for `meta.profile`.
Every entry is also checked against the base R4 rules of its type (`fhir-r4-base.yaml`), and so are
its contained resources, with any TDDUI profile they claim. TDDUI allows no contained Patient: the
usager is an entry of its own, under the identity rules of tddui-patient / tddui-patient-ins.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from services.core.outcome import Issue
from services.validator.checks import Context
from services.validator.compiler import Profile
from services.validator.messages import quote, say
from services.validator.plan import run_plan
from services.validator.ruleset import RuleSet

RULE_PROFILE_UNKNOWN = "tddui-bundle/profile-unknown"
RULE_PROFILE_TYPE = "tddui-bundle/profile-type"
RULE_PROFILE_VERSION = "tddui-bundle/profile-version"
RULE_SLICE_NONE = "tddui-bundle/slice-none"
RULE_SLICE_SEVERAL = "tddui-bundle/slice-several"
RULE_SLICE_UNPROFILED = "tddui-bundle/slice-unprofiled"
RULE_CONTAINED_PATIENT = "tddui-bundle/contained-patient"

Entry = tuple[int, dict[str, Any]]  # (index in Bundle.entry, resource)
_NONE: frozenset[str] = frozenset()


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
        return rtype, conform.get(j, _NONE)  # type: ignore[arg-type]

    # Slice matching first, so references to unclaimed entries know which profile they conform to.
    matched: dict[int, list[Profile]] = {}
    for i, resource in unclaimed:
        found = _match(rs, i, resource, lang, resolve, out)
        matched[i] = found
        conform[i] = frozenset(p.url for p in found)
    for i, resource in entries:
        at = f"Bundle.entry[{i}].resource"
        ctx = Context(lang, resolve, out=out)
        start = len(out)
        _base(rs, resource, at, ctx)
        middle = len(out)
        for profile in claimed.get(i) or matched.get(i) or ():
            profile.run(resource, at, ctx)
        if middle > start:
            _said_once(out, start, middle)
        contained = resource.get("contained")
        if isinstance(contained, list):
            _check_contained(rs, contained, at, ctx, lang)
    return out


def _said_once(out: list[Issue], start: int, middle: int) -> None:
    """A reference to the wrong resource type breaks the base R4 target rule and the profile's: say it once."""
    said = {i.expression for i in out[start:middle] if "/targets/" in (i.rule or "")}
    if said:
        out[middle:] = [i for i in out[middle:] if not ("/targets/" in (i.rule or "") and i.expression in said)]


def _base(rs: RuleSet, resource: dict[str, Any], at: str, ctx: Context) -> None:
    rtype = resource.get("resourceType")
    plan = rs.base_plans.get(rtype) if isinstance(rtype, str) else None
    if plan is not None:
        ctx.profile_id, ctx.profile_url = f"FHIR R4 {rtype}", None
        run_plan(plan, resource, at, ctx)


def _check_contained(rs: RuleSet, contained: list[Any], at: str, ctx: Context, lang: str) -> None:
    """Contained resources: base R4 rules of their type, any TDDUI profile they claim; no Patient."""
    for k, inner in enumerate(contained):
        if not isinstance(inner, dict):
            continue
        where = f"{at}.contained[{k}]"
        if inner.get("resourceType") == "Patient":
            ctx.out.append(Issue("error", "business-rule", say(lang, "contained-patient", at=where), (where,),
                                 RULE_CONTAINED_PATIENT, rs.bundle_url))
            continue
        _base(rs, inner, where, ctx)
        meta = inner.get("meta")
        urls = meta.get("profile") if isinstance(meta, dict) else None
        for raw in urls if isinstance(urls, list) else ():
            url = raw.partition("|")[0] if isinstance(raw, str) else None
            profile = (rs.profiles.get(url) or rs.others.get(url)) if url else None
            if profile is not None and profile.resource_type == inner.get("resourceType"):
                profile.run(inner, where, ctx)


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
            other = rs.others.get(url)
            if other is None:
                out.append(Issue("warning", "not-supported",
                                 say(lang, "profile-unknown", at=at, url=quote(raw), version=rs.ig_version,
                                     count=len(rs.profiles)), (at,), RULE_PROFILE_UNKNOWN, rs.bundle_url))
                continue
            if other.resource_type == resource.get("resourceType"):
                out.append(Issue("warning", "informational",
                                 say(lang, "slice-not-filled", at=at, url=quote(raw)), (at,), RULE_SLICE_NONE,
                                 rs.bundle_url))
            profile = other
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
        # Open slicing: not an error, and the entry is held to no profile it never claimed. The warning
        # names the closest slice and its first finding, for a vendor who meant to fill it.
        best, errors = min(results, key=lambda r: len(r[1]))
        out.append(Issue("warning", "informational",
                         say(lang, "slice-none", at=at, rtype=rtype, slices=names, best=best.id,
                             count=len(errors), first=errors[0].diagnostics), (at,), RULE_SLICE_NONE,
                         rs.bundle_url))
        return []
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
