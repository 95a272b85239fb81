"""FHIRPath invariants: each expression compiled once by fhirpathpy, evaluated defensively.

An invariant holds when its expression yields `true` or nothing (an empty result means the
constraint does not apply: `{} implies x` is empty, as the IG's rules rely on). It is broken when
the result contains `false`. Evaluation errors never escape: they become a string the engine
reports as a warning, because hostile JSON must not crash the validator.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import fhirpathpy
from fhirpathpy.models import models

Compiled = Callable[..., list[Any]]

_MODEL = models["r4"]


@functools.cache
def compiled(expression: str) -> Compiled:
    """The fhirpathpy function of `expression`, compiled once per distinct expression."""
    return fhirpathpy.compile(expression, _MODEL)


def holds(function: Compiled, node: Any, resource: Any = None) -> bool | str:
    """True (holds or does not apply), False (broken), or a short reason it could not be evaluated.

    `resource` is what `%resource` and `%rootResource` name (the R4 invariants use them): the resource
    the node belongs to, the node itself when not given.
    """
    root = node if resource is None else resource
    try:
        result = function(node, {"resource": root, "rootResource": root, "ucum": "http://unitsofmeasure.org"})
    except RecursionError:
        return "nesting too deep"
    except Exception as exc:  # noqa: BLE001 - fhirpathpy raises many types on odd content; never escape
        return type(exc).__name__
    if not isinstance(result, list):
        return True
    return not any(item is False for item in result)
