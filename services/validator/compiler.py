"""Rule files (decoded YAML) → compiled checks. The format is described in `schemas/README.md`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from services.validator.checks import (
    Binding,
    Card,
    Check,
    Context,
    Extension,
    ExtensionDef,
    Invariant,
    Matcher,
    Pattern,
    Slice,
    Targets,
    Types,
    group_slices,
)
from services.validator.invariants import compiled
from services.validator.paths import compile_path, pattern_matcher
from services.validator.plan import Plan, plan_of, run_plan
from services.validator.predicates import twin
from services.validator.terminology import ValueSet


@dataclass(slots=True)
class Profile:
    """A compiled profile: its identity and the checks an instance must pass."""

    id: str
    url: str
    resource_type: str
    title: str = ""
    slice_name: str | None = None
    checks: list[Check] = field(default_factory=list)
    plan: Plan = field(default_factory=Plan)  # the checks as one tree of paths (`plan_of(checks)`)

    def run(self, resource: Any, at: str, ctx: Context) -> None:
        ctx.profile_id, ctx.profile_url = self.id, self.url
        run_plan(self.plan, resource, at, ctx)


class RuleError(ValueError):
    """A rule file does not follow the format (raised at load time, never while validating)."""


@dataclass
class Compiler:
    """Compiles rule documents against the value sets, extensions and profile ids already known."""

    value_sets: Mapping[str, ValueSet]
    extensions: dict[str, ExtensionDef] = field(default_factory=dict)
    profile_types: dict[str, tuple[str, str]] = field(default_factory=dict)  # id → (type, url)

    # --- profiles ----------------------------------------------------------------------------------

    def profile(self, doc: Mapping[str, Any], rule_prefix: str | None = None) -> Profile:
        pid = doc["profile"]
        prefix = rule_prefix or pid
        prof = Profile(pid, doc.get("url", ""), doc["resourceType"], doc.get("title", ""))
        prof.checks = self.scope(doc, prefix, "")
        prof.plan = plan_of(prof.checks)
        return prof

    def scope(self, doc: Mapping[str, Any], prefix: str, scope: str) -> list[Check]:
        """Checks of one scope (a profile, or a slice item): elements, slices, invariants, in that order."""
        checks: list[Check] = []
        for path, spec in (doc.get("elements") or {}).items():
            checks.extend(self.element(str(path), spec or {}, prefix, scope))
        for key, spec in (doc.get("slices") or {}).items():
            checks.append(self.slice(str(key), spec or {}, prefix, scope))
        for inv in doc.get("invariants") or ():
            checks.append(self.invariant(inv, prefix))
        return group_slices(checks)

    def element(self, path: str, spec: Mapping[str, Any], prefix: str, scope: str) -> list[Check]:
        segs = compile_path(path)
        if not segs:
            raise RuleError(f"{prefix}: empty element path")
        name = f"{scope}.{path}" if scope else path
        def rule(kind: str) -> str:
            return f"{prefix}/{kind}/{name}"

        severity = spec.get("severity", "error")
        out: list[Check] = []
        if "card" in spec:
            lo, hi = parse_card(spec["card"])
            out.append(Card(rule("card"), segs[:-1], segs[-1], lo, hi, path, severity))
        if "types" in spec:
            if not segs[-1].choice:
                raise RuleError(f"{prefix}: 'types' needs a choice element (name[x]), not {path}")
            out.append(Types(rule("type"), segs[:-1], segs[-1].name, frozenset(spec["types"])))
        if "pattern" in spec:
            out.append(Pattern(rule("pattern"), segs, spec["pattern"], False, severity))
        if "fixed" in spec:
            out.append(Pattern(rule("fixed"), segs, spec["fixed"], True, severity))
        if "binding" in spec:
            out.append(self.binding(rule("binding"), segs, spec["binding"]))
        if "targets" in spec:
            out.append(self.targets(rule("targets"), segs, spec["targets"]))
        return out

    def binding(self, rule: str, segs: Any, spec: Mapping[str, Any]) -> Binding:
        url = spec["valueSet"]
        if url not in self.value_sets:
            raise RuleError(f"{rule}: unknown value set {url}")
        return Binding(rule, segs, spec["strength"], self.value_sets[url])

    def targets(self, rule: str, segs: Any, names: list[str]) -> Targets:
        allowed: dict[str, set[str] | None] = {}
        for name in names:
            if name[:1].isupper():  # a resource type: any profile of it
                allowed[name] = None
                continue
            if name not in self.profile_types:
                raise RuleError(f"{rule}: unknown target profile {name}")
            rtype, url = self.profile_types[name]
            current = allowed.setdefault(rtype, set())
            if current is not None:
                current.add(url)
        frozen = {t: (None if p is None else frozenset(p)) for t, p in allowed.items()}
        return Targets(rule, segs, frozen, " | ".join(names))

    def slice(self, key: str, spec: Mapping[str, Any], prefix: str, scope: str) -> Slice:
        path, _, name = key.rpartition(":")
        if not path or not name:
            raise RuleError(f"{prefix}: slice key {key!r} is not 'element:sliceName'")
        segs = compile_path(path)
        full = f"{scope}.{key}" if scope else key
        lo, hi = parse_card(spec.get("card", "0..*"))
        sub: list[Check] = []
        undecided: Matcher | None = None
        coding: tuple[str, str, str] | None = None
        if "url" in spec:  # an extension slice: discriminated by url
            url = spec["url"]
            match: Matcher = _url_matcher(url)
            what = url
            sub.append(Extension(self.extension_for(url, spec, f"{prefix}/ext/{full}")))
        elif "resolve" in spec:
            match = self._resolve_matcher(spec["resolve"])
            undecided = _unresolved
            what = "→ " + " | ".join(spec["resolve"])
        elif "match" in spec:
            pattern = spec["match"]
            test = pattern_matcher(pattern)

            def match(item: Any, _ctx: Context, test: Callable[[Any], bool] = test) -> bool:
                return test(item)

            what = _describe(pattern)
            coding = _coding_discriminator(pattern)
        else:
            raise RuleError(f"{prefix}: slice {key} has no discriminator (url, match or resolve)")
        if "targets" in spec and "url" not in spec:  # the slice item is itself a Reference
            sub.append(self.targets(f"{prefix}/targets/{full}", (), spec["targets"]))
        sub.extend(self.scope(spec, prefix, full))
        return Slice(f"{prefix}/slice/{full}", segs[:-1], segs[-1], name, match, lo, hi, sub, what, path, undecided,
                     coding)

    def _resolve_matcher(self, names: list[str]) -> Matcher:
        types = {n if n[:1].isupper() else self.profile_types[n][0] for n in names}
        urls = {self.profile_types[n][1] for n in names if not n[:1].isupper()}

        def match(item: Any, ctx: Context) -> bool:
            ref = item.get("reference") if isinstance(item, dict) else None
            target = ctx.resolve(ref) if isinstance(ref, str) else None
            if target is None:
                return False
            rtype, profiles = target
            return rtype in types and (not urls or not profiles or bool(profiles & urls))

        return match

    def invariant(self, spec: Mapping[str, Any], prefix: str) -> Invariant:
        expression = spec["expression"]
        guard = compile_path(spec["guard"]) if spec.get("guard") else None
        inv = Invariant(f"{prefix}/inv/{spec['key']}", compile_path(spec.get("path", "")), spec["key"],
                        spec["human"], compiled(expression), guard, spec.get("severity", "error"),
                        spec.get("guardExtension"))
        texts = spec.get("guardText") or ()
        inv.guard_text = tuple(t.encode() for t in ([texts] if isinstance(texts, str) else texts))
        inv.twin = twin(expression)
        return inv

    # --- extensions --------------------------------------------------------------------------------

    def extension_definition(self, doc: Mapping[str, Any]) -> ExtensionDef:
        """An IG extension definition (from extensions.yaml)."""
        return self._ext(doc["url"], doc["id"], doc, doc["id"])

    def extension_for(self, url: str, spec: Mapping[str, Any], rule: str) -> ExtensionDef:
        """The definition an extension slice points to: the IG's, or one described inline."""
        if url in self.extensions:
            return self.extensions[url]
        return self._ext(url, url.rsplit("/", 1)[-1], spec, rule)

    def _ext(self, url: str, label: str, doc: Mapping[str, Any], rule: str) -> ExtensionDef:
        d = ExtensionDef(url, label, rule=rule)
        if "extension" in doc:
            for sub_url, sub in (doc["extension"] or {}).items():
                lo, hi = parse_card(sub.get("card", "0..*"))
                d.subs[sub_url] = (lo, hi, self._ext(sub_url, f"{label}.{sub_url}", sub, f"{rule}.{sub_url}"))
        else:
            value = doc.get("value")
            d.value_types = frozenset([value] if isinstance(value, str) else value or ())
            if "binding" in doc:
                d.value_checks.append(self.binding(f"{rule}/binding", (), doc["binding"]))
            if "targets" in doc:
                d.value_checks.append(self.targets(f"{rule}/targets", (), doc["targets"]))
        for inv in doc.get("invariants") or ():
            d.invariants.append(self.invariant(inv, rule))
        return d


def _unresolved(item: Any, ctx: Context) -> bool:
    """A Reference to a resource that is not in the Bundle: which slice it fills cannot be known."""
    ref = item.get("reference") if isinstance(item, dict) else None
    return isinstance(ref, str) and bool(ref) and not ref.startswith("#") and ctx.resolve(ref) is None


def _coding_discriminator(pattern: Any) -> tuple[str, str, str] | None:
    """(element, system, code) of a pattern {element: {coding: [{system, code}]}} (strings), else None."""
    if not (isinstance(pattern, dict) and len(pattern) == 1):
        return None
    ((element, concept),) = pattern.items()
    if not (isinstance(concept, dict) and list(concept) == ["coding"] and isinstance(concept["coding"], list)
            and len(concept["coding"]) == 1):
        return None
    (coding,) = concept["coding"]
    if not (isinstance(coding, dict) and set(coding) == {"system", "code"}
            and type(coding["system"]) is str and type(coding["code"]) is str):
        return None
    return element, coding["system"], coding["code"]


def parse_card(text: object) -> tuple[int, int | None]:
    """'1..*' → (1, None); '0..1' → (0, 1)."""
    lo, sep, hi = str(text).partition("..")
    if not sep or not lo.isdigit() or not (hi == "*" or hi.isdigit()):
        raise RuleError(f"cardinality {text!r} is not 'min..max'")
    return int(lo), None if hi == "*" else int(hi)


def _url_matcher(url: str) -> Callable[[Any, Context], bool]:
    return lambda item, _ctx: isinstance(item, dict) and item.get("url") == url


def _describe(pattern: Any) -> str:
    """A short human form of a slice pattern: the codes and systems it pins."""
    found: list[str] = []

    def visit(p: Any) -> None:
        if isinstance(p, dict):
            if "code" in p and isinstance(p["code"], str):
                found.append(f"{p.get('system', '')}#{p['code']}" if "system" in p else p["code"])
                return
            if "system" in p and isinstance(p["system"], str):
                found.append(p["system"])
                return
            for v in p.values():
                visit(v)
        elif isinstance(p, list):
            for v in p:
                visit(v)
        elif isinstance(p, str):
            found.append(p)

    visit(pattern)
    return ", ".join(found) or "pattern"
