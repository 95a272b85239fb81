"""The transfer marker and the probe's verdicts: pure, table-tested."""

from __future__ import annotations

import copy

import pytest

from services.delivery.marker import (
    ProbePlan,
    Verdict,
    has_marker,
    mark_transfer,
    probe_plan,
    search_refused,
    verdict,
)
from tests.fixtures.tddui import make_bundle

SYSTEM = "https://relais.example/transfer"


def test_every_resource_is_marked_and_other_tags_and_meta_are_kept() -> None:
    bundle = make_bundle(8, seed=1)
    bundle["entry"][1]["resource"]["meta"] = {"profile": ["p"], "tag": [{"system": "s", "code": "keep"}]}
    before = copy.deepcopy(bundle)
    marked = mark_transfer(bundle, SYSTEM, "tr-1")
    assert bundle == before  # the input is never modified
    for entry in marked["entry"]:
        assert has_marker(entry["resource"], SYSTEM, "tr-1")
    meta = marked["entry"][1]["resource"]["meta"]
    assert meta["profile"] == ["p"]
    assert {"system": "s", "code": "keep"} in meta["tag"]


def test_marking_twice_is_marking_once() -> None:
    once = mark_transfer(make_bundle(4, seed=2), SYSTEM, "tr-1")
    assert mark_transfer(once, SYSTEM, "tr-1") == once
    assert not has_marker(once["entry"][0]["resource"], SYSTEM, "tr-2")


def test_plan_counts_plain_creates_and_searches_every_type() -> None:
    bundle = make_bundle(6, seed=3)
    bundle["entry"][0]["request"]["ifNoneExist"] = "identifier=x|1"  # conditional: may create nothing
    plan = probe_plan(bundle)
    types = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert set(plan.types) == set(types)
    assert sum(plan.required.values()) == len(types) - 1
    assert plan.required.get(types[0], 0) == types[1:].count(types[0])


PLAN = ProbePlan(("Encounter", "Observation", "Patient"), {"Encounter": 1, "Observation": 2, "Patient": 1})


@pytest.mark.parametrize(("found", "expected"), [
    ({"Encounter": 1, "Observation": 2, "Patient": 1}, Verdict.APPLIED),
    ({"Encounter": 2, "Observation": 4, "Patient": 2}, Verdict.APPLIED),  # applied twice is still applied
    ({}, Verdict.ABSENT),
    ({"Encounter": 0, "Observation": 0, "Patient": 0}, Verdict.ABSENT),
    ({"Encounter": 1, "Observation": 0, "Patient": 0}, Verdict.PARTIAL),
    ({"Encounter": 1, "Observation": 1, "Patient": 1}, Verdict.PARTIAL),
])
def test_verdict(found: dict[str, int], expected: Verdict) -> None:
    assert verdict(PLAN, found) is expected


def test_only_conditional_entries_found_is_applied() -> None:
    assert verdict(ProbePlan(("Patient",), {}), {"Patient": 1}) is Verdict.APPLIED


@pytest.mark.parametrize(("status", "refused"), [
    (400, True), (403, True), (404, True), (405, True), (501, True),
    (408, False), (429, False), (500, False), (502, False), (503, False),
])
def test_search_refused(status: int, refused: bool) -> None:
    assert search_refused(status) is refused
