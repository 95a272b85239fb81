"""Compiled profile checks: each one a small object that inspects a node and appends issues.

A check runs on a *scope* (a resource, or a slice item) at a FHIRPath location, with a `Context`
that knows the language, the profile being checked and how to resolve references in the Bundle.
Checks never raise on odd JSON: anything not shaped as expected simply does not match.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from services.core.outcome import Issue
from services.validator.invariants import Compiled, holds
from services.validator.messages import quote, say
from services.validator.paths import Item, Segment, choice_keys, fhir_type, locate, pattern_matcher, walk
from services.validator.plan import plan_of, run_plan
from services.validator.predicates import Predicate
from services.validator.terminology import ValueSet

Resolver = Callable[[object], tuple[str, frozenset[str]] | None]


@dataclass(slots=True)
class Context:
    """Per-entry state a check needs: language, current profile, and the Bundle's reference resolver."""

    lang: str
    resolve: Resolver  # reference string → (resource type, profile URLs of that entry) or None
    matching: bool = False  # slice matching: target *profiles* are not known yet, only types
    profile_id: str = ""
    profile_url: str | None = None
    out: list[Issue] = field(default_factory=list)

    def add(self, severity: str, code: str, rule: str, where: str, template: str, **values: object) -> None:
        """Report a finding at `where` (FHIRPath), its diagnostics from the message `template`."""
        values.setdefault("profile", self.profile_id)
        self.out.append(Issue(severity, code, say(self.lang, template, **values), (where,), rule,  # type: ignore[arg-type]
                              self.profile_url))


class Check:
    """A compiled rule, acting at the nodes its `node_path` reaches from the scope it runs on (a resource or
    a slice item): `at_node()` inspects one of them and reports through `ctx`; `run()` walks to them all."""

    __slots__ = ("node_path", "rule", "severity", "trigger", "trigger_twin")

    def __init__(self, rule: str, severity: str = "error", node_path: tuple[Segment, ...] = ()) -> None:
        self.rule = rule
        self.severity = severity
        self.node_path = node_path
        # The JSON key (and a primitive's `_key` twin) of the node without which the check finds nothing
        # there (a cardinality or slice with no minimum): `plan.py` then spares the call.
        self.trigger: str | None = None
        self.trigger_twin: str | None = None

    def silent_without(self, last: Segment, lo: int) -> None:
        """The check counts `last` under its node and reports nothing when there are none and `lo` is 0."""
        if lo == 0 and not last.choice:  # a choice (`value[x]`) has no one key to look for
            self.trigger = last.name
            self.trigger_twin = "_" + last.name if last.also_underscore else None

    def run(self, node: Any, at: str, ctx: Context) -> None:
        """The check on a scope: at every node its path reaches, in document order."""
        for loc, value in walk(node, at, self.node_path):
            self.at_node(loc, value, node, ctx)

    def at_node(self, loc: str, value: Any, root: Any, ctx: Context) -> None:
        """The check at one node `value` (located at `loc`) of the scope `root`."""
        raise NotImplementedError


class Card(Check):
    __slots__ = ("element", "last", "max", "min", "parents")

    def __init__(self, rule: str, parents: tuple[Segment, ...], last: Segment, lo: int, hi: int | None,
                 element: str, severity: str = "error") -> None:
        super().__init__(rule, severity, parents)
        self.parents, self.last, self.min, self.max, self.element = parents, last, lo, hi, element
        self.silent_without(last, lo)

    def at_node(self, ploc: str, pnode: Any, root: Any, ctx: Context) -> None:
        kids = self.last.select(pnode)
        n = len(kids)
        if n < self.min and not self.last.choice:
            n = _present(pnode, self.last.name, n)
        if n < self.min:
            ctx.add(self.severity, "required", self.rule, f"{ploc}.{self.last.name}", "card-min",
                    at=ploc, element=self.element, min=self.min, count=n)
        elif self.max is not None and n > self.max:
            key, index, _ = kids[self.max]
            ctx.add(self.severity, "structure", self.rule, locate(ploc, key, index), "card-max",
                    at=ploc, element=self.element, max=self.max, count=n)


def _present(node: Any, name: str, n: int) -> int:
    """How many `name` a node has when a primitive with only extensions (`_name`) counts as present.

    FHIR: a primitive element is present if it has a value *or* extensions (the official tddui-patient
    example sends `_birthDate` with the birth-order extension and no date, and birthDate 1..1 holds).
    """
    if not isinstance(node, dict):
        return n
    twin = node.get("_" + name)
    if twin is None:
        return n
    if isinstance(twin, list):
        values = node.get(name)
        values = values if isinstance(values, list) else []
        return sum(1 for i, t in enumerate(twin) if t is not None or (i < len(values) and values[i] is not None))
    return max(n, 1)


class Pattern(Check):
    __slots__ = ("fixed", "path", "test", "value")

    def __init__(self, rule: str, path: tuple[Segment, ...], value: Any, fixed: bool,
                 severity: str = "error") -> None:
        super().__init__(rule, severity, path)
        self.path, self.value, self.fixed = path, value, fixed
        self.test = pattern_matcher(value)

    def at_node(self, loc: str, value: Any, root: Any, ctx: Context) -> None:
        ok = value == self.value if self.fixed else self.test(value)
        if not ok:
            key = "pattern" if not self.fixed else ("fixed" if self.severity == "error" else "fixed-defective")
            ctx.add(self.severity, "value", self.rule, loc, key, at=loc, value=quote(value),
                    expected=quote(self.value))


class Types(Check):
    __slots__ = ("allowed", "base", "parents")

    def __init__(self, rule: str, parents: tuple[Segment, ...], base: str, allowed: frozenset[str]) -> None:
        super().__init__(rule, "error", parents)
        self.parents, self.base, self.allowed = parents, base, allowed

    def at_node(self, ploc: str, pnode: Any, root: Any, ctx: Context) -> None:
        if isinstance(pnode, dict):
            for key in choice_keys(pnode, self.base):
                found = fhir_type(key, self.base)
                if found not in self.allowed:
                    ctx.add("error", "structure", self.rule, f"{ploc}.{key}", "type", at=f"{ploc}.{key}",
                            found=found, allowed=" | ".join(sorted(self.allowed)))


class Binding(Check):
    __slots__ = ("path", "strength", "vs")

    def __init__(self, rule: str, path: tuple[Segment, ...], strength: str, vs: ValueSet) -> None:
        super().__init__(rule, "error" if strength == "required" else "warning", path)
        self.path, self.strength, self.vs = path, strength, vs

    def at_node(self, loc: str, value: Any, root: Any, ctx: Context) -> None:
        self.check_value(value, loc, ctx)

    def check_value(self, value: Any, loc: str, ctx: Context) -> None:
        vs = self.vs
        if isinstance(value, str):
            if not vs.admits_code(value):
                self._notin(loc, value, ctx)
            return
        if not isinstance(value, dict):
            return  # wrong JSON shapes are structure errors already
        if "coding" in value or "text" in value or ("system" not in value and "code" not in value):
            codings = [c for c in value.get("coding") or () if isinstance(c, dict)] if isinstance(
                value.get("coding"), list) else []
            if not codings:
                if self.strength == "required":
                    ctx.add("error", "code-invalid", self.rule, loc, "binding-nocode", at=loc,
                            valueset=vs.url, strength=self.strength)
                return
            if any(vs.admits(c.get("system"), c.get("code")) for c in codings):
                return
            where = f"{loc}.coding[0]" if len(codings) == 1 else loc
            shown = [f"{c.get('system')}#{c.get('code')}" for c in codings]
            self._notin(where, shown[0] if len(shown) == 1 else shown, ctx)
            return
        if not vs.admits(value.get("system"), value.get("code")):
            self._notin(loc, f"{value.get('system')}#{value.get('code')}", ctx)

    def _notin(self, loc: str, shown: object, ctx: Context) -> None:
        if self.strength not in ("required", "extensible", "preferred"):
            return
        kind, items = self.vs.describe()
        allowed = say(ctx.lang, "allowed-codes" if kind == "codes" else "allowed-systems",
                      codes=", ".join(items), systems=", ".join(items))
        ctx.add(self.severity, "code-invalid", self.rule, loc, "binding-notin", at=loc, value=quote(shown),
                valueset=self.vs.url, strength=self.strength, allowed=allowed)


class Targets(Check):
    """Reference targets: the resource type, and (outside slice matching) the profile of the entry."""

    __slots__ = ("allowed", "path", "shown")

    def __init__(self, rule: str, path: tuple[Segment, ...], allowed: dict[str, frozenset[str] | None],
                 shown: str) -> None:
        super().__init__(rule, "error", path)
        self.path, self.allowed, self.shown = path, allowed, shown  # type → allowed profile URLs (None: any)

    def at_node(self, loc: str, value: Any, root: Any, ctx: Context) -> None:
        self.check_value(value, loc, ctx)

    def check_value(self, value: Any, loc: str, ctx: Context) -> None:
        if not isinstance(value, dict):
            return
        reference = value.get("reference")
        if not isinstance(reference, str) or reference.startswith("#"):
            return
        target = ctx.resolve(reference)
        if target is None:
            return  # unresolved references are reported once, by the Bundle reference rules
        rtype, profiles = target
        at = f"{loc}.reference"
        if rtype not in self.allowed:
            ctx.add("error", "invalid", self.rule, at, "target-type", at=at, found=rtype, allowed=self.shown)
            return
        wanted = self.allowed[rtype]
        if ctx.matching or wanted is None or not profiles or profiles & wanted:
            return
        ctx.add("error", "invalid", self.rule, at, "target-profile", at=at,
                found=", ".join(sorted(p.rsplit("/", 1)[-1] for p in profiles)), allowed=self.shown)


Matcher = Callable[[Any, Context], bool]


class Slice(Check):
    __slots__ = ("coding", "element", "last", "match", "max", "min", "name", "parents", "plan", "sub", "undecided",
                 "what")

    def __init__(self, rule: str, parents: tuple[Segment, ...], last: Segment, name: str, match: Matcher,
                 lo: int, hi: int | None, sub: Sequence[Check], what: str, element: str,
                 undecided: Matcher | None = None, coding: tuple[str, str, str] | None = None) -> None:
        super().__init__(rule, "error", parents)
        self.parents, self.last, self.name, self.match = parents, last, name, match
        self.min, self.max, self.sub, self.what, self.element = lo, hi, tuple(sub), what, element
        self.plan = plan_of(self.sub)  # the checks of each item of the slice
        # Items whose membership cannot be decided (a reference to a resource not in the Bundle).
        self.undecided = undecided
        # (element, system, code) when `match` is the pattern {element: {coding: [{system, code}]}}, the
        # usual discriminator: a group of such slices reads each item's codings once (`coding_pairs`).
        self.coding = coding
        self.silent_without(last, lo)

    def at_node(self, ploc: str, pnode: Any, root: Any, ctx: Context) -> None:
        self.run_items(ploc, self.last.select(pnode), ctx)

    def run_items(self, ploc: str, selected: list[Item], ctx: Context,
                  codings: list[set[tuple[str, str]]] | None = None) -> None:
        """The slice over the already selected items of the sliced element under `ploc` (with `codings`,
        each item's `coding_pairs()` for this slice's element: the same decisions as `match`, found faster)."""
        if codings is not None and self.coding is not None:
            pair = self.coding[1:]
            items = [(locate(ploc, key, i), item) for (key, i, item), found in zip(selected, codings, strict=True)
                     if pair in found]
        else:
            items = [(locate(ploc, key, i), item) for key, i, item in selected if self.match(item, ctx)]
        n = len(items)
        if n < self.min:
            unknown = 0 if self.undecided is None else sum(1 for _, _, item in selected if self.undecided(item, ctx))
            if n + unknown >= self.min:  # consistent with the unresolved reference: a warning, not an error
                ctx.add("warning", "incomplete", self.rule, f"{ploc}.{self.last.name}", "slice-min-unresolved",
                        at=ploc, min=self.min, count=n, unknown=unknown, element=self.element, slice=self.name,
                        what=self.what)
            else:
                ctx.add("error", "required", self.rule, f"{ploc}.{self.last.name}", "slice-min", at=ploc,
                        min=self.min, count=n, element=self.element, slice=self.name, what=self.what)
        elif self.max is not None and n > self.max:
            ctx.add("error", "structure", self.rule, items[self.max][0], "slice-max", at=ploc,
                    max=self.max, count=n, element=self.element, slice=self.name, what=self.what)
        for loc, item in items:
            run_plan(self.plan, item, loc, ctx)


class SliceGroup(Check):
    """Consecutive slices of one element, run over one selection of its items (not one walk each)."""

    __slots__ = ("coded", "last", "parents", "slices")

    def __init__(self, slices: Sequence[Slice]) -> None:
        super().__init__(slices[0].rule, "error", slices[0].parents)
        self.slices = tuple(slices)
        self.parents, self.last = slices[0].parents, slices[0].last
        self.silent_without(self.last, max(s.min for s in slices))
        # The element whose codings discriminate at least two of the slices (see `Slice.coding`), if any.
        elements = [s.coding[0] for s in slices if s.coding is not None]
        self.coded = elements[0] if len(elements) > 1 and len(set(elements)) == 1 else None

    def at_node(self, ploc: str, pnode: Any, root: Any, ctx: Context) -> None:
        selected = self.last.select(pnode)
        found = [coding_pairs(item, self.coded) for _, _, item in selected] if self.coded is not None else None
        for piece in self.slices:
            piece.run_items(ploc, selected, ctx, found)


def coding_pairs(item: Any, element: str) -> set[tuple[str, str]]:
    """(system, code) of each coding of `item[element]` that the pattern {element: {coding: [{system, code}]}}
    would match on: an object's `coding`, a list or a single object, whose system and code are strings."""
    concept = item.get(element) if isinstance(item, dict) else None
    found = concept.get("coding") if isinstance(concept, dict) else None
    if found is None:
        return set()
    return {(c["system"], c["code"]) for c in (found if isinstance(found, list) else (found,))
            if isinstance(c, dict) and type(c.get("system")) is str and type(c.get("code")) is str}


def group_slices(checks: list[Check]) -> list[Check]:
    """`checks` with each run of consecutive slices on the same element merged into a `SliceGroup`."""
    out: list[Check] = []
    run: list[Slice] = []

    def flush() -> None:
        if len(run) > 1:
            out.append(SliceGroup(run))
        else:
            out.extend(run)
        run.clear()

    for check in checks:
        if isinstance(check, Slice) and run and (check.parents, check.last) == (run[0].parents, run[0].last):
            run.append(check)
            continue
        flush()
        if isinstance(check, Slice):
            run.append(check)
        else:
            out.append(check)
    flush()
    return out


class Invariant(Check):
    __slots__ = ("function", "guard", "guard_text", "guard_url", "human", "key", "path", "twin")

    def __init__(self, rule: str, path: tuple[Segment, ...], key: str, human: str, function: Compiled,
                 guard: tuple[Segment, ...] | None, severity: str, guard_url: str | None = None) -> None:
        super().__init__(rule, severity, path)
        self.path, self.key, self.human, self.function, self.guard = path, key, human, function, guard
        self.guard_url = guard_url  # skip unless the node carries an extension with this url
        self.guard_text: tuple[bytes, ...] = ()  # skip unless the node's JSON contains one of these
        self.twin: Predicate | None = None  # the Python twin of the expression (predicates.py), if any

    def at_node(self, loc: str, value: Any, root: Any, ctx: Context) -> None:
        if self.guard is not None and not walk(value, loc, self.guard):
            return  # the guard is empty: the invariant's antecedent cannot hold
        if self.guard_url is not None and not _has_extension(value, self.guard_url):
            return
        if self.guard_text and not _contains(value, self.guard_text):
            return
        result: bool | str | None = self.twin(value) if self.twin is not None else None
        if result is None:
            result = holds(self.function, value, root)  # %resource: the scope the check runs on
        if result is False:
            ctx.add(self.severity, "invariant", self.rule, loc, "invariant", at=loc, key=self.key,
                    human=self.human)
        elif result is not True:
            ctx.add("warning", "processing", self.rule, loc, "invariant-error", at=loc, key=self.key,
                    detail=result)


def _contains(node: Any, needles: tuple[bytes, ...]) -> bool:
    try:
        text = orjson.dumps(node)
    except TypeError:  # not JSON-serialisable: let fhirpathpy decide
        return True
    return any(n in text for n in needles)


def _has_extension(node: Any, url: str) -> bool:
    found = node.get("extension") if isinstance(node, dict) else None
    return isinstance(found, list) and any(isinstance(e, dict) and e.get("url") == url for e in found)


@dataclass(slots=True)
class ExtensionDef:
    """An extension's shape: simple (value types) or complex (sub-extensions), plus its own rules."""

    url: str
    label: str
    value_types: frozenset[str] | None = None  # None: complex
    value_checks: list[Binding | Targets] = field(default_factory=list)
    subs: dict[str, tuple[int, int | None, ExtensionDef]] = field(default_factory=dict)
    invariants: list[Invariant] = field(default_factory=list)
    rule: str = ""


class Extension(Check):
    """One extension instance against its definition (value type, sub-extensions, bindings, invariants)."""

    __slots__ = ("defn",)

    def __init__(self, defn: ExtensionDef) -> None:
        super().__init__(defn.rule)
        self.defn = defn

    def at_node(self, loc: str, value: Any, root: Any, ctx: Context) -> None:
        check_extension(self.defn, value, loc, ctx)


def check_extension(d: ExtensionDef, node: Any, at: str, ctx: Context) -> None:
    if not isinstance(node, dict):
        return
    keys = [k for k in node if k[:5] == "value" and k[5:6].isupper()]  # choice_keys(node, "value"), inlined
    nested = node.get("extension")
    if d.value_types is not None:
        if not keys:
            ctx.add("error", "required", d.rule + "/value", f"{at}.value", "ext-value-missing", at=at,
                    ext=d.label, allowed=" | ".join(sorted(d.value_types)))
        for key in keys:
            ftype = fhir_type(key, "value")
            if d.value_types and ftype not in d.value_types:
                ctx.add("error", "structure", d.rule + "/type", f"{at}.{key}", "type", at=f"{at}.{key}",
                        found=ftype, allowed=" | ".join(sorted(d.value_types)), profile=d.label)
            else:
                for check in d.value_checks:
                    check.check_value(node[key], f"{at}.{key}", ctx)
        if nested:
            ctx.add("error", "structure", d.rule + "/nested", f"{at}.extension[0]", "ext-nested-forbidden",
                    at=at, ext=d.label)
    else:
        if keys:
            ctx.add("error", "structure", d.rule + "/value", f"{at}.{keys[0]}", "ext-value-forbidden", at=at,
                    ext=d.label)
        items = [(f"{at}.extension[{i}]", e) for i, e in enumerate(nested)
                 if isinstance(e, dict)] if isinstance(nested, list) else []
        by_url: dict[str, list[tuple[str, dict[str, Any]]]] = {}  # one pass over the items, not one per sub
        for loc, e in items:
            if isinstance(e.get("url"), str):
                by_url.setdefault(e["url"], []).append((loc, e))
        for url, (lo, hi, sub) in d.subs.items():
            found = by_url.get(url, [])
            n = len(found)
            if n < lo:
                ctx.add("error", "required", f"{sub.rule}/card", f"{at}.extension", "card-min", at=at,
                        element=f"extension('{url}')", min=lo, count=n, profile=d.label)
            elif hi is not None and n > hi:
                ctx.add("error", "structure", f"{sub.rule}/card", found[hi][0], "card-max", at=at,
                        element=f"extension('{url}')", max=hi, count=n, profile=d.label)
            for loc, e in found:
                check_extension(sub, e, loc, ctx)
        if d.subs:
            for loc, e in items:
                other = e.get("url")
                if isinstance(other, str) and other not in d.subs and "/" not in other:
                    ctx.add("warning", "structure", d.rule + "/sub-unknown", f"{loc}.url", "ext-unknown-sub",
                            at=loc, url=quote(other), ext=d.label, known=", ".join(d.subs))
    for inv in d.invariants:
        inv.run(node, at, ctx)
