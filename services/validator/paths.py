"""Element paths of the rule files, compiled once, and walked over decoded JSON with FHIRPath locations.

A path is dotted element names relative to a resource or element: `identifier.system`,
`birthDate.extension` (the JSON `_birthDate.extension`), `value[x]` (any `valueString`,
`valueCodeableConcept`, ...). Walking yields `(location, value)` pairs, the location spelled as the
FHIRPath into the submitted Bundle (`Bundle.entry[3].resource.identifier[0].system`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

Node = tuple[str, Any]  # (FHIRPath location, JSON value)

_PRIMITIVE_CHILDREN = frozenset({"extension", "id"})


@dataclass(frozen=True, slots=True)
class Segment:
    """One step of a path: an element name, a choice (`value[x]`), or a primitive's `_name` twin."""

    name: str
    choice: bool = False  # `value[x]`: every key `value` + an upper-case type name
    also_underscore: bool = False  # followed by extension/id: look at `_name` too (primitives)

    def children(self, node: Any, at: str) -> list[Node]:
        """The values this segment selects under `node`, each with its location (lists expanded)."""
        if not isinstance(node, dict):
            return []
        out: list[Node] = []
        if self.choice:
            name, n = self.name, len(self.name)
            for key, value in node.items():
                if len(key) > n and key.startswith(name) and key[n].isupper():
                    _expand(out, f"{at}.{key}", value)
            return out
        value = node.get(self.name)
        if self.also_underscore and not isinstance(value, dict | list):
            # A primitive's extensions live in `_name`; a primitive without them still has "no extension".
            twin = node.get("_" + self.name)
            value = twin if twin is not None or value is None else {}
        _expand(out, f"{at}.{self.name}", value)
        return out


def _expand(out: list[Node], at: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, list):
        out.extend((f"{at}[{i}]", v) for i, v in enumerate(value) if v is not None)
    else:
        out.append((at, value))


def compile_path(text: str) -> tuple[Segment, ...]:
    """`'birthDate.extension'` → segments; an empty text is the node itself."""
    names = [n for n in text.split(".") if n]
    segments = []
    for i, name in enumerate(names):
        nxt = names[i + 1] if i + 1 < len(names) else None
        if name.endswith("[x]"):
            segments.append(Segment(name[:-3], choice=True))
        else:
            segments.append(Segment(name, also_underscore=nxt in _PRIMITIVE_CHILDREN))
    return tuple(segments)


def walk(node: Any, at: str, segments: tuple[Segment, ...]) -> list[Node]:
    """Every value reached from `node` by `segments`, with its location."""
    current: list[Node] = [(at, node)]
    for segment in segments:
        nxt: list[Node] = []
        for loc, value in current:
            nxt.extend(segment.children(value, loc))
        current = nxt
        if not current:
            break
    return current


def matches(value: Any, pattern: Any) -> bool:
    """FHIR pattern semantics: `value` holds everything `pattern` says (extra content allowed)."""
    if isinstance(pattern, dict):
        if not isinstance(value, dict):
            return False
        return all(matches(value.get(key), sub) for key, sub in pattern.items())
    if isinstance(pattern, list):
        values = value if isinstance(value, list) else ([] if value is None else [value])
        return all(any(matches(v, sub) for v in values) for sub in pattern)
    return bool(value == pattern and type(value) is type(pattern))


PRIMITIVES = frozenset({
    "base64Binary", "boolean", "canonical", "code", "date", "dateTime", "decimal", "id", "instant",
    "integer", "markdown", "oid", "positiveInt", "string", "time", "unsignedInt", "uri", "url", "uuid",
})
_BY_CAPITAL = {p[:1].upper() + p[1:]: p for p in PRIMITIVES}


def fhir_type(key: str, base: str) -> str:
    """The FHIR type a choice key names: ('valueString', 'value') → 'string'."""
    name = key[len(base):]
    return _BY_CAPITAL.get(name, name)


def choice_keys(node: dict[str, Any], base: str) -> Iterator[str]:
    """Every key of `node` that is a `base[x]` choice (`value` → `valueString`, ...)."""
    n = len(base)
    for key in node:
        if len(key) > n and key.startswith(base) and key[n].isupper():
            yield key
