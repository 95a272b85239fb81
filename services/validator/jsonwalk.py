"""Walking decoded JSON without recursion, and spelling locations as FHIRPath."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

# A location as a chain of (parent, key or index) links, spelled out only when an issue needs it:
# building every node's full path eagerly costs O(depth²), which hostile nesting would turn into a
# CPU sink, and even the formatting of the segments alone is most of a walk's cost on sane content.
Chain = tuple[Any, str | int] | None


def walk_objects(node: Any) -> Iterator[tuple[Chain, dict[str, Any]]]:
    """(location chain, object) for every JSON object under and including `node`, in document order.

    Iterative, so hostile nesting cannot exhaust the stack.
    """
    stack: list[tuple[Any, Chain]] = [(node, None)]
    pop, extend = stack.pop, stack.extend
    while stack:
        current, chain = pop()
        if isinstance(current, dict):
            yield chain, current
            children = [(v, (chain, k)) for k, v in current.items() if isinstance(v, dict | list)]
        elif isinstance(current, list):
            children = [(v, (chain, i)) for i, v in enumerate(current) if isinstance(v, dict | list)]
        else:
            continue
        if children:
            children.reverse()
            extend(children)


def spell(path: str, chain: Chain) -> str:
    """The FHIRPath of a chain, under `path`."""
    segments = []
    while chain is not None:
        chain, key = chain
        segments.append(f"[{key}]" if isinstance(key, int) else f".{element_name(key)}")
    return path + "".join(reversed(segments))


def entries(bundle: Mapping[str, Any]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(index, entry) for each entry that is a JSON object; the structure check reports the others."""
    found = bundle.get("entry")
    if isinstance(found, list):
        for i, entry in enumerate(found):
            if isinstance(entry, dict):
                yield i, entry


def loc_path(at: str, loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as FHIRPath: ('identifier', 0, 'system') → at.identifier[0].system."""
    parts = [at]
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item == "resource_type":
            parts.append(".resourceType")
        elif item and item != "root":  # 'root' marks the model itself, not an element
            parts.append(f".{element_name(item)}")
    return "".join(parts)


def element_name(key: str) -> str:
    """JSON '_birthDate' holds the id/extensions of primitive 'birthDate'; FHIRPath names it 'birthDate'."""
    return key[1:] if key.startswith("_") and len(key) > 1 else key
