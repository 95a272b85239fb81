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


SECRET = b"s" * 32


def key_of(b: Any, secret: bytes = SECRET) -> str | None:
    return person_key(b, secret)


def bundle(*identifiers: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:org", "resource": {"resourceType": "Organization", "identifier": [
            {"system": "http://finess.sante.gouv.fr", "value": "480787529"}]}},
        {"fullUrl": "urn:uuid:p", "resource": {"resourceType": "Patient", "identifier": list(identifiers)}}]}


def test_the_same_person_with_and_without_a_secondary_identifier_keeps_one_key() -> None:
    key = key_of(bundle(NIR, LOCAL))
    assert key is not None and len(key) == 16
    assert key_of(bundle(LICENCE, NIR, LOCAL)) == key
    assert key_of(bundle(LOCAL, LICENCE, NIR)) == key  # order of identifiers does not matter


def test_the_ins_wins_over_the_local_identifier_and_the_local_one_serves_without_ins() -> None:
    assert key_of(bundle(NIR)) == key_of(bundle(NIR, LOCAL))
    local_only = key_of(bundle(LOCAL))
    assert local_only is not None and local_only != key_of(bundle(NIR))
    assert key_of(bundle(LOCAL, LICENCE)) == local_only


def test_no_ins_and_no_local_identifier_means_no_person_key() -> None:
    assert key_of(bundle(LICENCE)) is None
    assert key_of(bundle()) is None
    assert key_of({"resourceType": "Bundle"}) is None and key_of(b"not json") is None


def test_two_persons_have_two_keys_and_the_key_hides_the_identifier() -> None:
    other = dict(NIR, value="180012B01234567")
    assert key_of(bundle(NIR)) != key_of(bundle(other))
    assert NIR["value"] not in (key_of(bundle(NIR)) or "")


def test_the_test_fixtures_persons_are_keyed() -> None:
    b = make_bundle(3, seed=7)
    without_extras = copy.deepcopy(b)
    assert key_of(b) is not None and key_of(b) == key_of(without_extras)


def test_the_key_is_keyed_a_copy_of_the_log_cannot_tell_whose_it_is() -> None:
    """Record keys travel in clear beside encrypted values: a plain hash of an INS would be reversed by trying
    every plausible number. Without the secret (held like the audit key) the key says nothing."""
    import hashlib

    key = key_of(bundle(NIR))
    assert key is not None and len(key) == 16
    plain = {hashlib.sha256(f"{p}{NIR['value']}".encode()).hexdigest()[:16]
             for p in ("", "relais-person/1|ins|")}
    assert key not in plain
    assert key_of(bundle(NIR), b"t" * 32) != key  # another secret, another key
