"""The depth check's walk: exact nesting depth of parsed JSON, and it stops once past the limit."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from services.ingress.limits import json_depth
from tests.fixtures.tddui import make_bundle


def _nested(levels: int) -> Any:
    """`levels` containers deep, alternating objects and arrays, with scalars beside each level."""
    node: Any = "leaf"
    for i in range(levels):
        node = {"n": node, "s": "text", "k": 1} if i % 2 else [1, node, "x"]
    return node


@pytest.mark.parametrize("levels", [1, 2, 3, 7, 20])
def test_depth_is_the_deepest_container(levels: int) -> None:
    assert json_depth(_nested(levels), 64) == levels
    # A shallow sibling does not count; the deep branch does wherever it sits.
    assert json_depth([{"a": 1}, _nested(levels)], 64) == max(levels, 1) + 1


def test_scalars_and_empty_containers() -> None:
    assert json_depth({}, 64) == 1
    assert json_depth({"a": {}, "b": [[], {}]}, 64) == 3


def test_counting_stops_past_the_limit() -> None:
    assert json_depth(_nested(500), 10) == 11


def test_a_real_bundle() -> None:
    bundle = orjson.loads(orjson.dumps(make_bundle(30, seed=3)))
    deepest = max(len(path) for path in _paths(bundle))
    assert json_depth(bundle, 64) == deepest


def _paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every chain of containers from the root (the reference: plain recursion)."""
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
    if children is None:
        return [path]
    here = (*path, node)
    return [p for child in children for p in _paths(child, here)] or [here]
