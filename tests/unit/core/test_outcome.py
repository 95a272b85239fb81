"""OperationOutcome: issues to FHIR JSON and back, the rule extension, the empty outcome, has_errors, issues_of."""

from __future__ import annotations

from typing import Any

import pytest

from services.core.outcome import (
    RULE_EXTENSION_URL,
    Issue,
    error,
    has_errors,
    information,
    issues_of,
    operation_outcome,
    warning,
)

EXPR = "Bundle.entry[3].resource.identifier[0].system"


@pytest.mark.parametrize("issue", [
    Issue("error", "required", "identifier is missing", (EXPR,), "tddui-patient-ins"),
    Issue("fatal", "structure", "not a Bundle"),
    Issue("warning", "value", "two places", ("Bundle.entry[0]", "Bundle.entry[1]")),
    Issue("information", "informational", "All OK"),
    Issue("error", "processing", "rule but no expression", rule="relais-route-no-target"),
])
def test_issue_round_trips_through_fhir_json(issue: Issue) -> None:
    assert Issue.from_fhir(issue.to_fhir()) == issue


@pytest.mark.parametrize(("issue", "expected"), [
    (error("required", "identifier is missing", EXPR, rule="tddui-patient-ins"),
     {"severity": "error", "code": "required", "diagnostics": "identifier is missing", "expression": [EXPR],
      "extension": [{"url": RULE_EXTENSION_URL, "valueString": "tddui-patient-ins"}]}),
    (warning("value", "odd date"),
     {"severity": "warning", "code": "value", "diagnostics": "odd date"}),
    (information("All OK", "Bundle"),
     {"severity": "information", "code": "informational", "diagnostics": "All OK", "expression": ["Bundle"]}),
])
def test_issue_to_fhir(issue: Issue, expected: dict[str, Any]) -> None:
    assert issue.to_fhir() == expected


def test_rule_extension_url_is_a_relais_canonical() -> None:
    assert RULE_EXTENSION_URL.startswith("https://")
    assert RULE_EXTENSION_URL.endswith("/StructureDefinition/issue-rule")


@pytest.mark.parametrize(("data", "expected"), [
    ({}, Issue("error", "processing", "")),
    ({"severity": "warning", "code": "value", "diagnostics": "d",
      "extension": [{"url": "http://other/ext", "valueString": "nope"}]},
     Issue("warning", "value", "d")),
    ({"severity": "error", "code": "invalid", "diagnostics": "d",
      "extension": [{"url": "http://other/ext", "valueString": "nope"},
                    {"url": RULE_EXTENSION_URL, "valueString": "r1"}]},
     Issue("error", "invalid", "d", rule="r1")),
])
def test_issue_from_fhir_defaults_and_foreign_extensions(data: dict[str, Any], expected: Issue) -> None:
    assert Issue.from_fhir(data) == expected


def test_operation_outcome_holds_every_issue_in_order() -> None:
    issues = [error("required", "a", "Bundle.entry[0]"), warning("value", "b")]
    oo = operation_outcome(issues)
    assert oo["resourceType"] == "OperationOutcome"
    assert [Issue.from_fhir(i) for i in oo["issue"]] == issues


@pytest.mark.parametrize("empty", [[], (), iter([])])
def test_empty_outcome_gets_one_information_issue(empty: Any) -> None:
    oo = operation_outcome(empty)
    assert oo == {"resourceType": "OperationOutcome",
                  "issue": [{"severity": "information", "code": "informational", "diagnostics": "All OK"}]}


@pytest.mark.parametrize(("severities", "expected"), [
    ([], False),
    (["information"], False),
    (["warning", "information"], False),
    (["warning", "error"], True),
    (["fatal"], True),
])
def test_has_errors(severities: list[str], expected: bool) -> None:
    issues = [Issue(s, "processing", s) for s in severities]  # type: ignore[arg-type]
    assert has_errors(issues) is expected
    assert has_errors(iter(issues)) is expected


@pytest.mark.parametrize(("severity", "blocks"), [
    ("fatal", True), ("error", True), ("warning", False), ("information", False)])
def test_is_error(severity: str, blocks: bool) -> None:
    assert Issue(severity, "processing", "x").is_error is blocks  # type: ignore[arg-type]


@pytest.mark.parametrize(("outcome", "expected"), [
    (operation_outcome([error("required", "identifier is missing", EXPR, rule="tddui-patient-ins"),
                        information("fine here"), warning("value", "two places", "Bundle.entry[0]")]),
     [{"severity": "error", "code": "required", "expression": [EXPR], "rule": "tddui-patient-ins",
       "diagnostics": "identifier is missing"},
      {"severity": "warning", "code": "value", "expression": ["Bundle.entry[0]"], "rule": None,
       "diagnostics": "two places"}]),
    ({"resourceType": "OperationOutcome", "issue": [{"code": "exception"}]},  # a target's terse outcome
     [{"severity": "error", "code": "exception", "expression": [], "rule": None, "diagnostics": ""}]),
    ({"issue": ["not an issue", {"severity": "error", "extension": ["odd", {"url": 3}]}]},
     [{"severity": "error", "code": None, "expression": [], "rule": None, "diagnostics": ""}]),
    (None, []), ("text", []), ({"issue": None}, []),
], ids=["errors-and-warnings", "defaults", "malformed-parts", "none", "not-a-dict", "no-issues"])
def test_issues_of_an_outcome_read_back(outcome: Any, expected: list[dict[str, Any]]) -> None:
    assert issues_of(outcome) == expected
