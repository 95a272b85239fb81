"""The TDDUI Bundles we hand out are valid: the factory keeps its promises (deterministic, sized, faithful to the
profile facts, valid), and the README's examples/*.json pass the validator (or the first thing a user tries fails)."""

from __future__ import annotations

import base64
import hashlib
import re
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.core.outcome import has_errors
from services.validator.logic import iter_references, validate_bundle
from tests.fixtures.tddui import (
    INS_NIR_TEST,
    LOCAL_USAGER,
    PROFILE_NAMES,
    SD,
    make_bundle,
    make_minimal_bundle,
    organization_finess,
    patient_identifier,
    with_document,
)

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.json"))
FAKE_FAMILIES = {"TESTUSAGER", "TESTPRO", "TESTCONTACT"}
# The four identifier formats the IG enforces with a regex (§10).
REGEX_TAGS = {"PDV", "BESO", "REPAS", "PA"}


def references(bundle: dict[str, Any]) -> list[str]:
    return [ref for e in bundle["entry"] for _, ref in iter_references(e["resource"], "")]


def profile_id(entry: dict[str, Any]) -> str:
    (url,) = entry["resource"]["meta"]["profile"]
    assert url.startswith(SD)
    return url.removeprefix(SD)


def test_same_seed_same_bundle() -> None:
    assert make_bundle(30, seed=7) == make_bundle(30, seed=7)
    assert orjson.dumps(make_bundle(30, seed=7)) == orjson.dumps(make_bundle(30, seed=7))


def test_different_seeds_different_people_and_ids() -> None:
    a, b = make_bundle(30, seed=1), make_bundle(30, seed=2)
    assert patient_identifier(a) != patient_identifier(b)
    assert {e["fullUrl"] for e in a["entry"]}.isdisjoint(e["fullUrl"] for e in b["entry"])


@pytest.mark.parametrize("size", [2, 3, 25, 26, 27, 30, 300])
def test_exact_size(size: int) -> None:
    assert len(make_bundle(size)["entry"]) == size


@pytest.mark.parametrize("size", [-1, 0, 1])
def test_too_small_is_refused(size: int) -> None:
    with pytest.raises(ValueError, match="at least"):
        make_bundle(size)


@pytest.mark.parametrize("patient_ins", [True, False])
def test_head_is_organization_patient_sejour(patient_ins: bool) -> None:
    bundle = make_bundle(30, patient_ins=patient_ins)
    head = [profile_id(e) for e in bundle["entry"][:3]]
    patient = "tddui-patient-ins" if patient_ins else "tddui-patient"
    assert head == ["tddui-organization", patient, "tddui-encounter-sejour"]
    assert bundle["type"] == "transaction"
    assert bundle["meta"]["profile"] == [SD + "tddui-bundle"]


def test_one_cycle_covers_every_entry_kind() -> None:
    profiles = Counter(profile_id(e) for e in make_bundle(29)["entry"])
    assert set(profiles) == set(PROFILE_NAMES) - {"tddui-patient"}
    assert set(profiles.values()) == {1}


def test_default_bundle_carries_a_small_document() -> None:
    docs = [
        e["resource"] for e in make_bundle()["entry"] if e["resource"]["resourceType"] == "DocumentReference"
    ]
    assert docs
    attachment = docs[0]["content"][0]["attachment"]
    assert base64.b64decode(attachment["data"]).startswith(b"%PDF")
    assert attachment["title"]


def test_urn_style_entries_and_references() -> None:
    bundle = make_bundle(60, seed=3)
    full_urls = [e["fullUrl"] for e in bundle["entry"]]
    assert len(set(full_urls)) == len(full_urls)
    for e in bundle["entry"]:
        assert e["request"] == {"method": "POST", "url": e["resource"]["resourceType"]}
        assert uuid.UUID(e["fullUrl"].removeprefix("urn:uuid:"))
        assert e["fullUrl"].startswith("urn:uuid:")
        assert "id" not in e["resource"]
    refs = references(bundle)
    assert len(refs) > 100
    assert set(refs) <= set(full_urls)
    # Every entry but the last few is referred to by something; the Organization and Patient by much.
    counts = Counter(refs)
    assert counts[full_urls[0]] > 5 and counts[full_urls[1]] > 20


def test_references_point_backwards() -> None:
    bundle = make_bundle(100, seed=4)
    position = {e["fullUrl"]: i for i, e in enumerate(bundle["entry"])}
    for i, e in enumerate(bundle["entry"]):
        for _, ref in iter_references(e["resource"], ""):
            assert position[ref] < i


def test_published_style_shape() -> None:
    bundle = make_bundle(30, seed=3, published_style=True)
    keys = set()
    for e in bundle["entry"]:
        resource = e["resource"]
        keys.add(f"{resource['resourceType']}/{resource['id']}")
        assert e["fullUrl"] == f"https://test-server.fr/{resource['resourceType']}/{resource['id']}"
        assert e["request"] == {"method": "POST", "url": PROFILE_NAMES[profile_id(e)]}
    assert e["request"]["url"] != resource["resourceType"]
    refs = references(bundle)
    assert refs and set(refs) <= keys
    assert make_bundle(3, published_style=True)["entry"][1]["request"]["url"] == "TDDUIPatientINS"


def test_ins_patient_identifier_is_a_test_ins() -> None:
    system, value = patient_identifier(make_bundle(5, seed=9))
    assert system == INS_NIR_TEST
    assert re.fullmatch(r"[12]\d{14}", value)
    assert int(value[13:]) == 97 - int(value[:13]) % 97  # the NIR key is right


def test_non_ins_patient_identifier_is_the_local_one() -> None:
    bundle = make_bundle(5, seed=9, patient_ins=False)
    system, value = patient_identifier(bundle)
    assert system == LOCAL_USAGER
    assert value == f"3{organization_finess(bundle)}/" + value.split("/")[1]
    patient = bundle["entry"][1]["resource"]
    assert patient["_birthDate"]["extension"][0]["url"] == SD + "tddui-birth-order"


def test_patient_identifier_needs_a_patient() -> None:
    bundle = make_minimal_bundle()
    del bundle["entry"][1]
    with pytest.raises(LookupError):
        patient_identifier(bundle)


def test_organization_finess_and_id_nat_st() -> None:
    bundle = make_bundle(3, seed=11)
    finess = organization_finess(bundle)
    assert finess and re.fullmatch(r"99\d{7}", finess)
    org = bundle["entry"][0]["resource"]
    id_nat_st = org["identifier"][0]
    assert (id_nat_st["system"], id_nat_st["value"]) == ("urn:oid:1.2.250.1.71.4.2.2", f"1{finess}")
    org["identifier"] = org["identifier"][:1]
    assert organization_finess(bundle) == finess  # read back from idNatSt
    org["identifier"] = []
    assert organization_finess(bundle) is None


def test_business_identifiers_follow_the_ig_namespaces() -> None:
    bundle = make_bundle(60, seed=12)
    finess = organization_finess(bundle)
    seen = set()
    for e in bundle["entry"]:
        raw = e["resource"].get("identifier", [])
        for ident in raw if isinstance(raw, list) else [raw]:
            system = ident["system"]
            if not system.startswith("https://identifiant-medicosocial-"):
                continue
            assert ident["value"].startswith(f"3{finess}/")
            tag = re.fullmatch(r"3\d{9}/[A-Za-z0-9]+(?:-([A-Za-z]+)-[A-Za-z0-9]+)?", ident["value"])
            assert tag, ident["value"]
            seen.add(tag[1])
    assert REGEX_TAGS <= seen
    assert {
        "SEJOUR",
        "EVN",
        "EVAL",
        "TPPro",
        "TPPat",
        "PPER",
        "ATTE",
        "OBJE",
        "ACTI",
        "BILA",
        "MORE",
        "PRES",
        "PSCO",
    } <= seen


def test_personal_data_is_obviously_fake() -> None:
    bundle = make_bundle(60, seed=13)
    families = {
        n["family"] for e in bundle["entry"] for n in e["resource"].get("name", []) if isinstance(n, dict)
    }
    assert families == FAKE_FAMILIES
    text = orjson.dumps(bundle).decode()
    assert "@example.invalid" in text and "TESTVILLE" in text


def test_minimal_bundle() -> None:
    bundle = make_minimal_bundle()
    assert [e["resource"]["resourceType"] for e in bundle["entry"]] == ["Organization", "Patient"]
    assert validate_bundle(bundle) == []


@pytest.mark.parametrize("size_bytes", [0, 1, 1000, 250_000, 2_000_000])
def test_with_document_adds_one_attachment_of_about_that_size(size_bytes: int) -> None:
    bundle = make_bundle(10, seed=2)
    before = orjson.dumps(bundle)
    out = with_document(bundle, size_bytes)
    assert orjson.dumps(bundle) == before  # the input is left alone
    assert out["entry"][:-1] == bundle["entry"]
    doc = out["entry"][-1]
    attachment = doc["resource"]["content"][0]["attachment"]
    assert abs(len(attachment["data"]) - size_bytes) <= 4
    raw = base64.b64decode(attachment["data"])
    assert attachment["size"] == len(raw)
    assert base64.b64decode(attachment["hash"]) == hashlib.sha1(raw, usedforsecurity=False).digest()
    assert doc["resource"]["subject"]["reference"] == bundle["entry"][1]["fullUrl"]
    assert validate_bundle(orjson.dumps(out)) == []
    assert with_document(bundle, size_bytes) == out


def test_with_document_keeps_the_published_style() -> None:
    out = with_document(make_bundle(5, published_style=True), 100)
    doc = out["entry"][-1]
    assert doc["fullUrl"].startswith("https://test-server.fr/DocumentReference/")
    assert doc["request"]["url"] == "TDDUIDocumentReference"
    assert doc["resource"]["subject"]["reference"].startswith("Patient/")
    assert not has_errors(validate_bundle(out))


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(2, 300), st.integers(0, 2**32), st.booleans(), st.booleans())
def test_every_factory_bundle_validates_without_errors(
    size: int, seed: int, ins: bool, published: bool
) -> None:
    issues = validate_bundle(
        orjson.dumps(make_bundle(size, seed=seed, patient_ins=ins, published_style=published))
    )
    assert not has_errors(issues)
    # Published style: what Relais repairs — every request.url, and one note on entry-to-entry references.
    assert all(i.rule in ("tddui-bundle-request-url", "tddui-bundle-ref-portable") for i in issues)
    assert len([i for i in issues if i.rule == "tddui-bundle-request-url"]) == (size if published else 0)
    assert len([i for i in issues if i.rule == "tddui-bundle-ref-portable"]) <= (1 if published else 0)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_bundles_have_no_errors(path: Path) -> None:
    errors = [i for i in validate_bundle(path.read_bytes()) if i.is_error]
    assert not errors, [(i.expression, i.diagnostics) for i in errors]


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 2
