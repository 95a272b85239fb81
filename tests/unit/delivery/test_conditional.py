"""Conditional create: which entries get request.ifNoneExist, and when a target's CapabilityStatement allows it."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from services.core.targets import TargetDirectory
from services.delivery.conditional import conditional_types, if_none_exist, make_conditional
from tests.fixtures.tddui import make_bundle

CAPABILITY = {"resourceType": "CapabilityStatement", "rest": [
    {"mode": "server", "resource": [{"type": "Patient", "conditionalCreate": True},
                                    {"type": "Encounter", "conditionalCreate": False},
                                    {"type": "Organization"}, {"conditionalCreate": True}, "junk"]},
    {"mode": "client", "resource": [{"type": "Task", "conditionalCreate": True}]},
]}


@pytest.mark.parametrize(("capability", "types"), [
    (CAPABILITY, {"Patient"}),
    ({"resourceType": "CapabilityStatement", "rest": [{"mode": "server"}]}, set()),
    (None, set()),
    ({"rest": 5}, set()),
])
def test_types_declared_with_conditional_create(capability: Any, types: set[str]) -> None:
    assert conditional_types(capability) == types


@pytest.mark.parametrize(("identifier", "expected"), [
    ([{"system": "https://finess.esante.gouv.fr", "value": "750000001"}],
     "identifier=https://finess.esante.gouv.fr|750000001"),
    ([{"value": "no-system"}, {"system": "urn:oid:1.2.3", "value": "A&B=C #1"}],
     "identifier=urn:oid:1.2.3|A%26B%3DC%20%231"),  # a query string: & = # and spaces are escaped
    ({"system": "urn:oid:1.2.3", "value": "single"}, "identifier=urn:oid:1.2.3|single"),
    ([{"system": "urn:oid:1.2.3", "value": ""}], None),
    (42, None),
    (None, None),
])
def test_if_none_exist_uses_the_first_complete_identifier(identifier: Any, expected: str | None) -> None:
    assert if_none_exist({"resourceType": "Patient", "identifier": identifier}) == expected


def test_only_identified_post_entries_of_the_given_types_become_conditional() -> None:
    bundle = make_bundle(12, seed=5)
    identified = [e for e in bundle["entry"] if isinstance(e["resource"].get("identifier"), list)]
    made = copy.deepcopy(bundle)
    assert make_conditional(made, None) == len(identified) > 0
    for before, after in zip(bundle["entry"], made["entry"], strict=True):
        condition = after["request"].get("ifNoneExist")
        assert (condition is not None) == isinstance(before["resource"].get("identifier"), list)
        assert after["resource"] == before["resource"]  # only the request changes
    only_patients = copy.deepcopy(bundle)
    assert make_conditional(only_patients, frozenset({"Patient"})) == 1
    # A producer's own condition is kept; PUT entries are not creates.
    own = copy.deepcopy(bundle)
    own["entry"][1]["request"]["ifNoneExist"] = "identifier=mine|1"
    own["entry"][0]["request"]["method"] = "PUT"
    make_conditional(own, None)
    assert own["entry"][1]["request"]["ifNoneExist"] == "identifier=mine|1"
    assert "ifNoneExist" not in own["entry"][0]["request"]


@pytest.mark.parametrize(("written", "mode"), [("auto", "auto"), ("on", "on"), ("off", "off"), ("true", "on"),
                                               (None, "auto")])
def test_targets_file_option_reads_yaml_on_and_off(written: str | None, mode: str) -> None:
    line = f"\n    conditional_create: {written}" if written else ""
    directory = TargetDirectory.model_validate(yaml.safe_load(
        f"targets:\n  - id: a\n    base_url: http://127.0.0.1:9/fhir{line}\n"))
    assert directory.targets[0].conditional_create == mode
