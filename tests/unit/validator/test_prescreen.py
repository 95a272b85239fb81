"""The prescreen (services/validator/prescreen.py) never hides a finding of the fhir.resources models:
whenever it says a resource is surely valid, the models accept it. And it does say so of valid Bundles,
or the validator would silently lose its speed.

Hostile JSON: every corpus Bundle (valid instances, the issue-17 broken instances, the README examples)
with one or two values replaced, anywhere, by odd values (wrong JSON types, empty and blank strings,
impossible dates, out-of-range integers, malformed ids, codes, oids, uuids and base64, unknown keys, a
second type of a choice element, nested resources of odd types).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.validator.base import check_structure, resource_class
from services.validator.prescreen import surely_valid
from tests.reference.hl7 import corpus

CORPUS = {**corpus.valid(), **corpus.broken_base()}
NAMES = sorted(CORPUS)

ODD: tuple[Any, ...] = (
    *corpus.ODD_VALUES, " ", "\u00a0", "\t", "a  b", " a", "x\n", "2025-02-30", "2025-13-01", "2025-01-01T25:00:00Z",
    "2025-01-01T10:00:00", "2025", "10:61:00", "2025-02-29", "2024-02-29T10:00:00.1234567Z",
    "2025-01-01T10:00:00+14:00", "2025-12-31T23:59:60Z", "0999-01-01", "2025-01-01T10:00Z",
    2**40, -1, 0, -0.0, 1e308, "1e5", "urn:oid:1.02", "urn:uuid:zz",
    "not base64!", "a" * 300, "id with space", "é", "<div>x</div>", "http://x y", {"resourceType": "Nope"},
    {"resourceType": "Patient", "id": "p"}, {"resourceType": "Patient", "bogus": 1}, [None], [{}], [[]],
    {"extension": []}, {"id": "x"}, {"fhir_comments": "c"}, {"url": "http://x", "valueString": "v", "valueCode": "c"},
)
OTHER: tuple[Any, ...] = ("x", True, 1.5, {"text": "t"})
KEYS = ("bogus", "fhir_comments", "valueQuantity", "_value", "resourceType", "id", "extension", "deceasedBoolean",
        "deceasedDateTime", "effectiveDateTime", "effectivePeriod", "_birthDate", "birthDate__ext", "class_")


def _models_accept(klass: Any, data: Any) -> bool:
    try:
        klass.model_validate(data)
    except Exception:  # noqa: BLE001 - any refusal of the models counts
        return False
    return True


def _resources(bundle: dict[str, Any]) -> list[tuple[Any, Any]]:
    """(class, JSON) of each part the structure check validates on its own: the shell, each entry resource."""
    found = bundle.get("entry")
    out: list[tuple[Any, Any]] = []
    if isinstance(found, list):
        shell = {**bundle, "entry": [{k: v for k, v in e.items() if k != "resource"} if isinstance(e, dict) else e
                                     for e in found]}
        out.append((Bundle, shell))
        for e in found:
            r = e.get("resource") if isinstance(e, dict) else None
            klass = resource_class(r["resourceType"]) if isinstance(r, dict) and isinstance(
                r.get("resourceType"), str) else None
            if klass is not None:
                out.append((klass, r))
    return out


@st.composite
def hostile(draw: st.DrawFn) -> dict[str, Any]:
    bundle = corpus.copy(CORPUS[draw(st.sampled_from(NAMES))])
    for _ in range(draw(st.integers(1, 2))):
        places = list(corpus.paths(bundle))
        if not places:
            break
        where = draw(st.sampled_from(places))
        how = draw(st.sampled_from(["replace", "add", "drop"]))
        # Drawn values are copied: inserted as they are, a later step would mutate the module's ODD values, and
        # the next examples would differ from what Hypothesis recorded (flaky generation, unreplayable failures).
        if how == "replace":
            corpus.mutate(bundle, where, copy.deepcopy(draw(st.sampled_from(ODD))))
            continue
        node: Any = bundle
        for step in where[:-1]:
            node = node[step]
        if how == "add" and isinstance(node, dict):  # a new key beside the place
            node[draw(st.sampled_from(KEYS))] = copy.deepcopy(draw(st.sampled_from(ODD + OTHER)))
        elif how == "drop":  # the element removed (a required one, maybe)
            del node[where[-1]]
    return bundle


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(bundle=hostile())
def test_surely_valid_only_when_the_models_accept(bundle: dict[str, Any]) -> None:
    for klass, data in _resources(bundle):
        if surely_valid(klass, data):
            assert _models_accept(klass, data), data


@pytest.mark.parametrize("name", NAMES)
def test_the_corpus_agrees_with_the_models(name: str) -> None:
    for klass, data in _resources(CORPUS[name]):
        if surely_valid(klass, data):
            assert _models_accept(klass, data)


@pytest.mark.parametrize("name", sorted(corpus.valid()))
def test_valid_bundles_take_the_fast_path(name: str) -> None:
    for klass, data in _resources(CORPUS[name]):
        assert surely_valid(klass, data), (name, klass.__name__)
        assert check_structure(CORPUS[name]) == []
