"""The subject key: a stable, opaque hash of the Bundle's first identified Patient."""

from __future__ import annotations

import copy
import hashlib
import re
from typing import Any

import pytest

from services.validator.subject import subject_key
from tests.fixtures.tddui import make_bundle, patient_identifier

INS = "urn:oid:1.2.250.1.213.1.4.8"
PI = "https://identifiant-medicosocial-localusager.esante.gouv.fr"


def patient(*identifiers: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Patient", **({"identifier": list(identifiers)} if identifiers else {})}


def bundle(*resources: dict[str, Any], full_urls: bool = True) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {**({"fullUrl": f"urn:uuid:00000000-0000-4000-8000-{i:012d}"} if full_urls else {}), "resource": r}
        for i, r in enumerate(resources)]}


def h16(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("patient_ins", [True, False])
def test_fixture_bundles_have_a_16_hex_key_that_hides_the_identifier(seed: int, patient_ins: bool) -> None:
    b = make_bundle(6, seed=seed, patient_ins=patient_ins)
    key = subject_key(b)
    assert key is not None and re.fullmatch(r"[0-9a-f]{16}", key)
    _, value = patient_identifier(b)
    assert value not in key


def test_known_answer_the_key_must_not_change_between_versions() -> None:
    # Changing the derivation would re-key every person's deliveries and break their ordering.
    b = bundle(patient({"system": INS, "value": "253039959841588"}))
    assert subject_key(b) == h16(f"{INS}|253039959841588")


def test_same_person_in_two_exports_has_the_same_key() -> None:
    a = make_bundle(4, seed=3)
    b = make_bundle(12, seed=3)
    assert subject_key(a) == subject_key(b)


def test_different_people_have_different_keys() -> None:
    keys = {subject_key(make_bundle(3, seed=s)) for s in range(10)}
    assert len(keys) == 10


def test_identifier_order_does_not_matter() -> None:
    ins = {"system": INS, "value": "1"}
    pi = {"system": PI, "value": "3996463343/X"}
    assert subject_key(bundle(patient(ins, pi))) == subject_key(bundle(patient(pi, ins)))


def test_only_the_patient_counts() -> None:
    b = make_bundle(8, seed=2)
    other = copy.deepcopy(b)
    for entry in other["entry"]:
        if entry["resource"]["resourceType"] != "Patient":
            entry["resource"]["id"] = "changed"
            entry["resource"].setdefault("identifier", []).append({"system": "urn:x", "value": "y"})
    assert subject_key(other) == subject_key(b)


@pytest.mark.parametrize(("b", "expected"), [
    pytest.param({}, None, id="no-entry"),
    pytest.param({"entry": None}, None, id="entry-null"),
    pytest.param(bundle(), None, id="empty"),
    pytest.param(bundle({"resourceType": "Organization", "identifier": [{"system": "s", "value": "v"}]}),
                 None, id="no-patient"),
    pytest.param(bundle(patient(), full_urls=False), None, id="patient-without-identifier-or-fullUrl"),
    pytest.param(bundle(patient({"system": INS}), full_urls=False), None, id="identifier-without-value"),
    pytest.param({"entry": ["junk", 3, {"resource": "junk"}, {"fullUrl": "urn:uuid:x"},
                           {"resource": patient({"system": INS, "value": "42"})}]},
                 h16(f"{INS}|42"), id="junk-entries-skipped"),
    pytest.param(bundle(patient()), h16("urn:uuid:00000000-0000-4000-8000-000000000000"),
                 id="fullUrl-fallback"),
    pytest.param(bundle(patient({"value": "42"})), h16("|42"), id="value-without-system"),
    pytest.param(bundle(patient({"system": INS, "value": ""}, {"system": PI, "value": "p"})), h16(f"{PI}|p"),
                 id="empty-value-ignored"),
    pytest.param(bundle(patient({"system": INS, "value": "1"}), patient({"system": INS, "value": "2"})),
                 h16(f"{INS}|1"), id="first-patient-wins"),
])
def test_subject_key_table(b: dict[str, Any], expected: str | None) -> None:
    assert subject_key(b) == expected


def test_a_later_identified_patient_is_used_when_the_first_has_nothing() -> None:
    b = {"entry": [{"resource": patient()}, {"resource": patient({"system": INS, "value": "9"})}]}
    assert subject_key(b) == h16(f"{INS}|9")
