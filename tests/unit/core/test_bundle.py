"""entry_resources(): each entry of a parsed Bundle with its resource, whatever the JSON a producer sent."""

from __future__ import annotations

from typing import Any

import pytest

from services.core.bundle import entry_resources

PATIENT = {"resourceType": "Patient", "id": "p"}
ENCOUNTER = {"resourceType": "Encounter", "id": "e"}


@pytest.mark.parametrize(("bundle", "expected"), [
    ({"entry": [{"resource": PATIENT, "request": {"method": "POST"}}, {"resource": ENCOUNTER}]},
     [({"resource": PATIENT, "request": {"method": "POST"}}, PATIENT), ({"resource": ENCOUNTER}, ENCOUNTER)]),
    ({"entry": [{"request": {"method": "DELETE"}}, {"resource": "text"}, "entry", 3, None, {"resource": PATIENT}]},
     [({"resource": PATIENT}, PATIENT)]),  # entries without a resource object are passed over
    ({"entry": {"resource": PATIENT}}, []),  # an object where the array belongs
    ({"entry": None}, []), ({}, []), ([PATIENT], []), (None, []), ("Bundle", []),
], ids=["two-entries", "odd-entries", "entry-not-a-list", "entry-null", "no-entry", "not-a-bundle", "none", "text"])
def test_entry_resources(bundle: Any, expected: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
    assert list(entry_resources(bundle)) == expected
