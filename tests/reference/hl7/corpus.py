"""The test corpus the differential test and the benchmark hand to both validators: name → Bundle.

* valid instances: the factory Bundles (both patient profiles, RESTful and urn fullUrls, minimal) and the
  README's examples/*.json;
* broken instances: every base-FHIR case of `tests/unit/validator/test_conformance.py`, and a sample of
  the TDDUI broken instances of `tests/fixtures/tddui_cases.py` (which base FHIR must find clean);
* mutations: drawn by hypothesis in the test (`mutate` applies one).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path as FilePath
from typing import Any

import orjson

from tests.fixtures.tddui import make_bundle, make_minimal_bundle
from tests.fixtures.tddui_cases import broken_cases, full_bundle, profile_ids

Path = tuple[str | int, ...]

# Values FHIR's strict JSON forbids in most places, and that lax parsers let through.
ODD_VALUES: tuple[Any, ...] = ("false", "3.20", None, [], {}, 1, True, "", 2.5, {"x": "y"}, ["a"])


def copy(bundle: dict[str, Any]) -> dict[str, Any]:
    return orjson.loads(orjson.dumps(bundle))  # type: ignore[no-any-return]


EXAMPLES = FilePath(__file__).resolve().parents[3] / "examples"


def valid() -> dict[str, dict[str, Any]]:
    return {
        "valid/29-ins": make_bundle(29),
        "valid/29-no-ins": make_bundle(29, patient_ins=False),
        "valid/8-restful": make_bundle(8, published_style=True),
        "valid/12-seed-7": make_bundle(12, seed=7),
        "valid/minimal": make_minimal_bundle(),
        **{f"example/{p.name}": orjson.loads(p.read_bytes()) for p in sorted(EXAMPLES.glob("*.json"))},
    }


def broken_base() -> dict[str, dict[str, Any]]:
    """The issue-17 cases (base FHIR R4 and open slicing), each applied to its base Bundle."""
    from tests.unit.validator import test_conformance as cases
    from tests.unit.validator import test_r4_invariants as more

    out: dict[str, dict[str, Any]] = {}
    for group, base in ((cases.BROKEN, cases.BASE), (cases.RESTFUL, cases.PUBLISHED), (cases.VALID, cases.BASE)):
        for param in group:
            bundle = copy(base)
            param.values[0](bundle)
            out[f"issue17/{param.id}"] = bundle
    for group in (more.BROKEN, more.VALID):  # the data-type invariants of the second pass (tim-*, sqty-1, ...)
        for param in group:
            bundle = copy(more.BASE)
            param.values[0](bundle)
            out[f"issue17/{param.id}"] = bundle
    return out


def broken_tddui(every: int = 8) -> dict[str, dict[str, Any]]:
    """Every `every`-th TDDUI broken instance: TDDUI rules, which base FHIR must not object to."""
    cases = [c for pid in profile_ids() for c in broken_cases(pid)]
    out: dict[str, dict[str, Any]] = {}
    for case in cases[::every]:
        bundle, _ = full_bundle(case.profile)
        case.mutate(bundle)
        out[f"tddui/{case.rule}"] = bundle
    return out


def paths(node: Any, prefix: Path = ()) -> Iterator[Path]:
    """Every place in a JSON document (object keys and array items), in document order."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key != "resourceType":
                yield (*prefix, key)
                yield from paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield (*prefix, i)
            yield from paths(value, (*prefix, i))


def mutate(bundle: dict[str, Any], where: Path, value: Any) -> None:
    """Set the value at `where` (the path must exist)."""
    node: Any = bundle
    for step in where[:-1]:
        node = node[step]
    node[where[-1]] = value
