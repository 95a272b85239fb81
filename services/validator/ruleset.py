"""The TDDUI rule set: the YAML files under `services/validator/rules/` (= `schemas/tddui/`), loaded once.

`tddui-profiles.yaml` holds one YAML document per entry profile; every other file is a single document.

`ruleset()` compiles everything on first use and caches it for the life of the process; profiles
are indexed by canonical URL (without `|version`) and by resource type, in Bundle slice order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

import yaml

from services.validator.checks import Check, ExtensionDef, SliceGroup
from services.validator.compiler import Compiler, Profile, RuleError
from services.validator.plan import Plan
from services.validator.terminology import ValueSet, compile_value_sets

PROFILES_FILE = "tddui-profiles.yaml"


@dataclass(slots=True)
class RuleSet:
    """Every compiled rule, ready for the engine."""

    ig_version: str
    bundle_url: str
    accepted_versions: frozenset[str]
    profiles: dict[str, Profile] = field(default_factory=dict)  # canonical URL → profile of a Bundle slice
    others: dict[str, Profile] = field(default_factory=dict)  # canonical URL → TDDUI profile that is no slice
    by_type: dict[str, list[Profile]] = field(default_factory=dict)  # resource type → slice profiles
    base: dict[str, list[Check]] = field(default_factory=dict)  # resource type → base FHIR R4 checks
    base_plans: dict[str, Plan] = field(default_factory=dict)  # resource type → those checks' plan
    extensions: dict[str, ExtensionDef] = field(default_factory=dict)
    value_sets: dict[str, ValueSet] = field(default_factory=dict)
    namespace: str = ""  # IG StructureDefinition base, for 'unknown TDDUI profile' findings

    def rule_counts(self) -> dict[str, int]:
        """Rules per profile (top-level checks, slices counted with their inner checks)."""
        return {p.id: _count(p.checks) for p in self.profiles.values()}


def _count(checks: list[Check]) -> int:
    total = 0
    for check in checks:
        if isinstance(check, SliceGroup):
            total += _count(list(check.slices))
            continue
        total += 1
        total += _count(list(getattr(check, "sub", ())))
    return total


def rules_dir() -> Traversable:
    """The rule files as shipped in the package (a plain data directory beside this module)."""
    return resources.files("services.validator") / "rules"


def _documents() -> dict[str, Any]:
    """File name → its document (the profiles file: its list of documents)."""
    docs: dict[str, Any] = {}
    for entry in sorted(rules_dir().iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            loaded = list(yaml.load_all(entry.read_text(encoding="utf-8"), Loader=yaml.CSafeLoader))
            docs[entry.name] = loaded if entry.name == PROFILES_FILE else loaded[0]
    return docs


@functools.cache
def ruleset() -> RuleSet:
    """The compiled TDDUI rules (loaded from the package on first call, then cached)."""
    return build(_documents())


def build(docs: dict[str, Any]) -> RuleSet:
    """Compile decoded rule documents (file name → content)."""
    terminology = docs["terminology.yaml"]
    code_systems = {cs["url"]: [str(c) for c in cs["concepts"]] for cs in terminology["codeSystems"]}
    value_sets = compile_value_sets(code_systems, terminology["valueSets"])
    bundle = docs["tddui-bundle.yaml"]
    profile_docs = {d["profile"]: d for d in docs[PROFILES_FILE]}
    compiler = Compiler(value_sets)
    for pid, d in profile_docs.items():
        compiler.profile_types[pid] = (d["resourceType"], d["url"])
    for ext in docs["extensions.yaml"]["extensions"]:
        compiler.extensions[ext["url"]] = compiler.extension_definition(ext)
    rs = RuleSet(str(bundle["igVersion"]), bundle["url"], frozenset(bundle["acceptedVersions"]),
                 extensions=compiler.extensions, value_sets=dict(value_sets),
                 namespace=bundle["url"].rsplit("/", 1)[0] + "/")
    for slice_name, pid in bundle["entrySlices"].items():
        if pid not in profile_docs:
            raise RuleError(f"tddui-bundle: slice {slice_name} names unknown profile {pid}")
        prof = compiler.profile(profile_docs[pid])
        prof.slice_name = slice_name
        rs.profiles[prof.url] = prof
        rs.by_type.setdefault(prof.resource_type, []).append(prof)
    for pid in bundle.get("otherProfiles") or ():
        if pid not in profile_docs:
            raise RuleError(f"tddui-bundle: otherProfiles names unknown profile {pid}")
        prof = compiler.profile(profile_docs[pid])
        rs.others[prof.url] = prof
    base = docs["fhir-r4-base.yaml"]
    targets = base.get("referenceTargets") or {}
    for rtype in sorted(set(base["resources"] or {}) | set(targets)):
        doc = dict((base["resources"] or {}).get(rtype) or {})
        elements = dict(doc.get("elements") or {})
        for path, types in (targets.get(rtype) or {}).items():
            elements[path] = {**(elements.get(path) or {}), "targets": types}
        doc = {"profile": f"fhir-r4/{rtype}", "resourceType": rtype, **doc, "elements": elements}
        compiled = compiler.profile(doc)
        rs.base[rtype], rs.base_plans[rtype] = compiled.checks, compiled.plan
    return rs
