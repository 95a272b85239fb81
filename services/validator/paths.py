"""Element paths of the rule files, compiled once, and walked over decoded JSON with FHIRPath locations.

A path is dotted element names relative to a resource or element: `identifier.system`,
`birthDate.extension` (the JSON `_birthDate.extension`), `value[x]` (any `valueString`,
`valueCodeableConcept`, ...). Walking yields `(location, value)` pairs, the location spelled as the
FHIRPath into the submitted Bundle (`Bundle.entry[3].resource.identifier[0].system`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
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
        return [(locate(at, key, i), v) for key, i, v in self.select(node)]

    def select(self, node: Any) -> list[Item]:
        """What `children` selects, with the location still in pieces (most values never need one)."""
        if not isinstance(node, dict):
            return []
        out: list[Item] = []
        if self.choice:
            name, n = self.name, len(self.name)
            for key, value in node.items():
                if len(key) > n and key.startswith(name) and key[n].isupper():
                    _expand(out, key, value)
            return out
        name = self.name
        value = node.get(name)
        if not self.also_underscore:
            if value is None:
                return []
            if isinstance(value, list):
                return [(name, i, v) for i, v in enumerate(value) if v is not None]
            return [(name, None, value)]
        if not isinstance(value, dict | list):
            # A primitive's extensions live in `_name`; a primitive without them still has "no extension".
            twin = node.get("_" + name)
            value = twin if twin is not None or value is None else {}
        _expand(out, name, value)
        return out


Item = tuple[str, int | None, Any]  # (element key, index in its list or None, value)


def locate(at: str, key: str, index: int | None) -> str:
    """The FHIRPath of an `Item` under `at`."""
    return f"{at}.{key}" if index is None else f"{at}.{key}[{index}]"


def _expand(out: list[Item], key: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, list):
        out.extend((key, i, v) for i, v in enumerate(value) if v is not None)
    else:
        out.append((key, None, value))


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
    if not segments:
        return [(at, node)]
    if len(segments) == 1:  # the usual rule path, one plain element: no intermediate lists
        segment = segments[0]
        if not segment.choice and not segment.also_underscore:
            if not isinstance(node, dict):
                return []
            name = segment.name
            value = node.get(name)
            if value is None:
                return []
            if isinstance(value, list):
                return [(f"{at}.{name}[{i}]", v) for i, v in enumerate(value) if v is not None]
            return [(f"{at}.{name}", value)]
    current: list[Node] = [(at, node)]
    for segment in segments:
        nxt: list[Node] = []
        append = nxt.append
        for loc, value in current:
            for key, index, child in segment.select(value):
                append((f"{loc}.{key}" if index is None else f"{loc}.{key}[{index}]", child))
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


def pattern_matcher(pattern: Any) -> Callable[[Any], bool]:
    """`matches(value, pattern)` as a function compiled once per pattern (slice discriminators run often)."""
    if isinstance(pattern, dict):
        parts = [(key, pattern_matcher(sub)) for key, sub in pattern.items()]
        if len(parts) == 1:  # the usual discriminator shape: unrolled, it is most of a slice's cost
            (key1, test1), = parts
            return lambda value: isinstance(value, dict) and test1(value.get(key1))
        if len(parts) == 2:
            (key1, test1), (key2, test2) = parts
            return lambda value: isinstance(value, dict) and test1(value.get(key1)) and test2(value.get(key2))

        def match_object(value: Any) -> bool:
            if not isinstance(value, dict):
                return False
            get = value.get
            return all(test(get(key)) for key, test in parts)

        return match_object
    if isinstance(pattern, list):
        tests = [pattern_matcher(sub) for sub in pattern]
        if len(tests) == 1:
            test = tests[0]

            def match_one(value: Any) -> bool:
                if isinstance(value, list):
                    return any(test(v) for v in value)
                return value is not None and test(value)

            return match_one

        def match_list(value: Any) -> bool:
            values = value if isinstance(value, list) else ([] if value is None else [value])
            return all(any(test(v) for v in values) for test in tests)

        return match_list
    kind = type(pattern)
    return lambda value: bool(value == pattern and type(value) is kind)


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
