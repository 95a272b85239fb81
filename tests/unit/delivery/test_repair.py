"""Envelope repair, table-driven: every reference form FHIR allows inside a Bundle."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

from services.delivery.repair import repair_transaction
from tests.fixtures.tddui import make_bundle

BASE = "https://test-server.fr"


def entry(rtype: str, rid: str, full_url: str | None, url: str | None = None, **body: Any) -> dict[str, Any]:
    e: dict[str, Any] = {"resource": {"resourceType": rtype, "id": rid, **body},
                         "request": {"method": "POST", "url": url or rtype}}
    if full_url is not None:
        e["fullUrl"] = full_url
    return e


def bundle(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}


def patient(full_url: str | None = f"{BASE}/Patient/p1") -> dict[str, Any]:
    return entry("Patient", "p1", full_url, url="TDDUIPatientINS")


@pytest.mark.parametrize(("reference", "resolves"), [
    ("Patient/p1", True),                       # relative Type/id
    ("Patient/p1/_history/3", True),            # versioned relative
    (f"{BASE}/Patient/p1", True),               # absolute, equal to the fullUrl
    (f"{BASE}/Patient/p1/_history/2", True),    # absolute, versioned
    ("https://elsewhere.fr/Patient/p1", False),  # another server's Patient: outside the Bundle
    ("Patient/unknown", False),                 # not in the Bundle: the target may hold it
    ("Organization/org-9", False),              # outside resource
    ("#contained-1", False),                    # contained: stays inside its resource
])
def test_reference_forms(reference: str, resolves: bool) -> None:
    source = bundle(patient(), entry("Encounter", "e1", f"{BASE}/Encounter/e1", subject={"reference": reference}))
    result = repair_transaction(source)
    patient_urn = result.bundle["entry"][0]["fullUrl"]
    new_ref = result.bundle["entry"][1]["resource"]["subject"]["reference"]
    assert patient_urn.startswith("urn:uuid:")
    assert new_ref == (patient_urn if resolves else reference)


def test_urn_references_and_fullurls_stay_as_they_are() -> None:
    source = make_bundle(30, seed=3)  # urn:uuid fullUrls, urn references, request.url = type
    result = repair_transaction(source)
    assert result.bundle == source
    assert result.changes == ()


def test_request_url_set_to_resource_type() -> None:
    result = repair_transaction(bundle(patient(), entry("Encounter", "e1", None, url="TDDUIEncounterSejour")))
    assert [e["request"]["url"] for e in result.bundle["entry"]] == ["Patient", "Encounter"]
    kinds = [(c.kind, c.expression, c.before, c.after) for c in result.changes if c.kind == "request-url"]
    assert kinds == [("request-url", "Bundle.entry[0].request.url", "TDDUIPatientINS", "Patient"),
                     ("request-url", "Bundle.entry[1].request.url", "TDDUIEncounterSejour", "Encounter")]


def test_references_in_extensions_and_nested_backbones() -> None:
    encounter = entry(
        "Encounter", "e1", f"{BASE}/Encounter/e1",
        extension=[{"url": "https://x/ext", "valueReference": {"reference": "Patient/p1"}},
                   {"url": "https://x/complex",
                    "extension": [{"url": "a", "valueReference": {"reference": "Patient/p1"}}]}],
        participant=[{"individual": {"reference": f"{BASE}/Patient/p1"}}],
    )
    result = repair_transaction(bundle(patient(), encounter))
    urn = result.bundle["entry"][0]["fullUrl"]
    resource = result.bundle["entry"][1]["resource"]
    assert resource["extension"][0]["valueReference"]["reference"] == urn
    assert resource["extension"][1]["extension"][0]["valueReference"]["reference"] == urn
    assert resource["participant"][0]["individual"]["reference"] == urn
    expressions = {c.expression for c in result.changes if c.kind == "reference"}
    assert "Bundle.entry[1].resource.extension[1].extension[0].valueReference.reference" in expressions
    assert "Bundle.entry[1].resource.participant[0].individual.reference" in expressions


def test_contained_resources_are_left_alone() -> None:
    enc = entry("Encounter", "e1", None, contained=[{"resourceType": "Location", "id": "l1",
                                                     "partOf": {"reference": "Patient/p1"}}],
                location=[{"location": {"reference": "#l1"}}])
    result = repair_transaction(bundle(patient(), enc))
    resource = result.bundle["entry"][1]["resource"]
    assert resource["contained"][0]["partOf"]["reference"] == "Patient/p1"
    assert resource["location"][0]["location"]["reference"] == "#l1"


def test_nothing_else_changes_byte_for_byte() -> None:
    source = make_bundle(30, seed=5, published_style=True)
    original = copy.deepcopy(source)
    result = repair_transaction(source)
    assert source == original  # the input is not modified
    for before, after in zip(source["entry"], result.bundle["entry"], strict=True):
        # Outside fullUrl, request.url and the rewritten references, each entry is identical JSON.
        assert orjson.dumps(_strip(before)) == orjson.dumps(_strip(after))
    assert {k: v for k, v in source.items() if k != "entry"} == {k: v for k, v in result.bundle.items() if k != "entry"}


def test_deterministic_across_attempts_and_full_urls_mapped_back() -> None:
    source = make_bundle(12, seed=9, published_style=True)
    first, second = repair_transaction(source), repair_transaction(source)
    assert orjson.dumps(first.bundle) == orjson.dumps(second.bundle)
    assert set(first.full_urls) == {e["fullUrl"] for e in source["entry"]}
    assert [first.full_urls[e["fullUrl"]] for e in source["entry"]] == [e["fullUrl"] for e in first.bundle["entry"]]


def test_switches_off() -> None:
    source = bundle(patient(), entry("Encounter", "e1", None, url="X", subject={"reference": "Patient/p1"}))
    assert repair_transaction(source, request_url=False, references=False).bundle is source
    only_refs = repair_transaction(source, request_url=False)
    assert only_refs.bundle["entry"][1]["request"]["url"] == "X"
    only_urls = repair_transaction(source, references=False)
    assert only_urls.bundle["entry"][1]["resource"]["subject"]["reference"] == "Patient/p1"
    assert only_urls.bundle["entry"][0]["fullUrl"] == f"{BASE}/Patient/p1"


def _strip(entry: dict[str, Any]) -> Any:
    e = copy.deepcopy(entry)
    e.pop("fullUrl", None)
    e.get("request", {}).pop("url", None)
    return _drop_refs(e)


def _drop_refs(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _drop_refs(v) for k, v in node.items() if k != "reference"}
    if isinstance(node, list):
        return [_drop_refs(v) for v in node]
    return node


def _identity_walk(node: Any) -> list[int]:
    """The ids of every dict and list below `node`, in order (to prove nothing was copied or replaced)."""
    if isinstance(node, dict):
        return [id(node), *(i for v in node.values() for i in _identity_walk(v))]
    if isinstance(node, list):
        return [id(node), *(i for v in node for i in _identity_walk(v))]
    return []


def test_copy_on_write_leaves_the_input_untouched_and_shares_what_it_does_not_change() -> None:
    source = make_bundle(30, seed=11, published_style=True)
    snapshot, identities = copy.deepcopy(source), _identity_walk(source)
    result = repair_transaction(source)
    assert source == snapshot and _identity_walk(source) == identities  # not one object of the input changed
    assert result.changes and result.bundle is not source and result.bundle["entry"] is not source["entry"]
    # The output is right: what a deep copy then in-place repair would give, change for change.
    expected = copy.deepcopy(source)
    by_where = {c.expression: c.after for c in result.changes}
    for i, e in enumerate(expected["entry"]):
        e["fullUrl"] = by_where.get(f"Bundle.entry[{i}].fullUrl", e["fullUrl"])
        e["request"]["url"] = by_where.get(f"Bundle.entry[{i}].request.url", e["request"]["url"])
    assert orjson.dumps(_drop_refs(result.bundle)) == orjson.dumps(_drop_refs(expected))
    assert all(c.after.startswith("urn:uuid:") for c in result.changes if c.kind == "reference")
    # An entry part with nothing to rewrite is the input's own object, not a copy.
    for before, after in zip(source["entry"], result.bundle["entry"], strict=True):
        for key, value in before["resource"].items():
            if isinstance(value, dict | list) and "reference" not in orjson.dumps(value).decode():
                assert after["resource"][key] is value, key


def test_a_bundle_needing_no_repair_is_returned_as_is() -> None:
    source = make_bundle(30, seed=3)
    assert repair_transaction(source).bundle is source
