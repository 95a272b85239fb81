"""The person key (issue 15): INS when present, else the ESSMS's local usager id; other identifiers never count."""

from __future__ import annotations

import copy
from typing import Any

from services.core.person import LOCAL_USAGER_SYSTEM, person_key
from tests.fixtures.tddui import make_bundle

NIR = {"use": "official", "system": "urn:oid:1.2.250.1.213.1.4.8", "value": "253039959841588"}
LOCAL = {"use": "usual", "system": LOCAL_USAGER_SYSTEM, "value": "3480787529/194704032"}
# The official example's driving licence: its system sorts before the INS one.
LICENCE = {"type": {"coding": [{"code": "DL"}]}, "system": "https://ants.gouv.fr/", "value": "12AB34567"}


def bundle(*identifiers: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:org", "resource": {"resourceType": "Organization", "identifier": [
            {"system": "http://finess.sante.gouv.fr", "value": "480787529"}]}},
        {"fullUrl": "urn:uuid:p", "resource": {"resourceType": "Patient", "identifier": list(identifiers)}}]}


def test_the_same_person_with_and_without_a_secondary_identifier_keeps_one_key() -> None:
    key = person_key(bundle(NIR, LOCAL))
    assert key is not None and len(key) == 16
    assert person_key(bundle(LICENCE, NIR, LOCAL)) == key
    assert person_key(bundle(LOCAL, LICENCE, NIR)) == key  # order of identifiers does not matter


def test_the_ins_wins_over_the_local_identifier_and_the_local_one_serves_without_ins() -> None:
    assert person_key(bundle(NIR)) == person_key(bundle(NIR, LOCAL))
    local_only = person_key(bundle(LOCAL))
    assert local_only is not None and local_only != person_key(bundle(NIR))
    assert person_key(bundle(LOCAL, LICENCE)) == local_only


def test_no_ins_and_no_local_identifier_means_no_person_key() -> None:
    assert person_key(bundle(LICENCE)) is None
    assert person_key(bundle()) is None
    assert person_key({"resourceType": "Bundle"}) is None and person_key(b"not json") is None


def test_two_persons_have_two_keys_and_the_key_hides_the_identifier() -> None:
    other = dict(NIR, value="180012B01234567")
    assert person_key(bundle(NIR)) != person_key(bundle(other))
    assert NIR["value"] not in (person_key(bundle(NIR)) or "")


def test_the_test_fixtures_persons_are_keyed() -> None:
    b = make_bundle(3, seed=7)
    without_extras = copy.deepcopy(b)
    assert person_key(b) is not None and person_key(b) == person_key(without_extras)
