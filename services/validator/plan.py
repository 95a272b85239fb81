"""A scope's checks as a tree of element paths, so a resource is walked once per profile, not once per rule.

Each check acts at the nodes its `node_path` reaches (`identifier.type` for a binding, `identifier` for
the slices and cardinalities under it). Rules share their paths' prefixes (`identifier`, then `.type`,
`.system`, `.value`, ...), so `plan_of` merges those paths into one tree and `run_plan` visits each
element the tree names once, calling every check attached there; absent elements cost nothing.

The findings are exactly those of running the checks one after the other: each check still meets its
nodes in document order, and the findings are put back in check order at the end (a stable sort, done
only when the tree's order interleaved them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.core.outcome import Issue
from services.validator.paths import Segment


class Context(Protocol):
    """What a plan reads of a check's context (`checks.Context`): where findings go."""

    out: list[Issue]


class Check(Protocol):
    """What a plan reads of a check (`checks.Check`; a protocol, so that checks.py may build plans)."""

    node_path: tuple[Segment, ...]
    trigger: str | None
    trigger_twin: str | None

    def at_node(self, at: str, node: Any, scope: Any, ctx: Any) -> None: ...

Mark = tuple[int, int, int]  # (check's index in its scope, first finding, end) in ctx.out
# (index, the check's bound `at_node`, its `trigger` and `trigger_twin`): read once, called many times.
Here = tuple[int, Callable[[str, Any, Any, "Context"], None], str | None, str | None]


@dataclass(slots=True)
class Plan:
    """One node of the tree: the checks acting here (with their index in the scope), then the children."""

    here: tuple[Here, ...] = ()
    kids: tuple[tuple[Segment, Plan, str | None], ...] = ()  # the name when a plain `node.get(name)` selects


@dataclass(slots=True)
class _Draft:
    here: list[tuple[int, Check]] = field(default_factory=list)
    kids: dict[Segment, _Draft] = field(default_factory=dict)

    def freeze(self) -> Plan:
        here = tuple((i, c.at_node, c.trigger, c.trigger_twin) for i, c in self.here)
        return Plan(here, tuple((seg, d.freeze(), None if seg.choice or seg.also_underscore else seg.name)
                                            for seg, d in self.kids.items()))


def plan_of(checks: Sequence[Check]) -> Plan:
    """The tree of `checks`' node paths (a segment is a key of its own: `value[x]` and `_name` select apart)."""
    root = _Draft()
    for index, check in enumerate(checks):
        node = root
        for segment in check.node_path:
            node = node.kids.setdefault(segment, _Draft())
        node.here.append((index, check))
    return root.freeze()


def run_plan(plan: Plan, scope: Any, at: str, ctx: Context) -> None:
    """Every check of `plan` on `scope` (located at `at`), findings appended to `ctx.out` in check order."""
    if not plan.kids:  # every check acts on the scope itself (a slice item's extension, ...): already in order
        is_object = type(scope) is dict
        for _, at_node, key, twin in plan.here:
            if key is None or not is_object or key in scope or (twin is not None and twin in scope):
                at_node(at, scope, scope, ctx)
        return
    out = ctx.out
    start = len(out)
    marks: list[Mark] = []
    _visit(plan, scope, at, scope, ctx, marks)
    if len(marks) > 1 and any(marks[k][0] > marks[k + 1][0] for k in range(len(marks) - 1)):
        found = out[start:]
        ordered: list[Issue] = []
        for _, first, end in sorted(marks, key=lambda m: m[0]):
            ordered.extend(found[first - start:end - start])
        out[start:] = ordered


def _visit(plan: Plan, node: Any, loc: str, root: Any, ctx: Context, marks: list[Mark]) -> None:
    out = ctx.out
    is_object = type(node) is dict
    for index, at_node, key, twin in plan.here:
        if key is not None and is_object and key not in node and (twin is None or twin not in node):
            continue  # nothing to count and no minimum: the check would find nothing
        first = len(out)
        at_node(loc, node, root, ctx)
        if len(out) > first:
            marks.append((index, first, len(out)))
    for segment, sub, name in plan.kids:
        if name is None:
            for key, i, value in segment.select(node):
                _visit(sub, value, f"{loc}.{key}" if i is None else f"{loc}.{key}[{i}]", root, ctx, marks)
            continue
        # `segment.select(node)` inlined for a plain element: most are absent, and this is the hot loop.
        value = node.get(name) if isinstance(node, dict) else None
        if value is None:
            continue
        if isinstance(value, list):
            for i, item in enumerate(value):
                if item is not None:
                    _visit(sub, item, f"{loc}.{name}[{i}]", root, ctx, marks)
        else:
            _visit(sub, value, f"{loc}.{name}", root, ctx, marks)
