"""The plan (a scope's checks as one tree of paths, walked once) finds exactly what the checks find run one
after the other: the same findings, in the same order, on every TDDUI broken instance and on valid ones."""

from __future__ import annotations

from typing import Any

import pytest

from services.core.outcome import Issue
from services.validator.checks import Binding, Card, Check, Context, Pattern
from services.validator.paths import compile_path
from services.validator.plan import plan_of, run_plan
from services.validator.ruleset import ruleset
from services.validator.terminology import ValueSet
from tests.fixtures.tddui_cases import _context, broken_cases, full_bundle, profile_ids


def _one_by_one(checks: list[Check], scope: Any, at: str, ctx: Context) -> list[Issue]:
    for check in checks:
        check.run(scope, at, ctx)
    return ctx.out


def _planned(checks: list[Check], scope: Any, at: str, ctx: Context) -> list[Issue]:
    run_plan(plan_of(checks), scope, at, ctx)
    return ctx.out


def _both(checks: list[Check], scope: Any, at: str, bundle: dict[str, Any]) -> tuple[list[Issue], list[Issue]]:
    return _one_by_one(checks, scope, at, _context(bundle)), _planned(checks, scope, at, _context(bundle))


def test_findings_come_back_in_check_order_when_the_tree_visits_them_out_of_it() -> None:
    # Check 0 acts two levels down, check 1 on the scope itself: the tree runs 1 first, then 0 at each item.
    vs = ValueSet("urn:vs", {"urn:s": frozenset({"ok"})})
    checks: list[Check] = [
        Binding("r/binding", compile_path("identifier.type"), "required", vs),
        Card("r/card", (), compile_path("name")[0], 1, None, "name"),
        Pattern("r/pattern", compile_path("identifier.system"), "urn:x", False),
    ]
    scope = {"identifier": [{"type": {"coding": [{"system": "urn:s", "code": "no"}]}, "system": "urn:y"},
                            {"type": {"coding": [{"system": "urn:s", "code": "bad"}]}, "system": "urn:z"}]}
    expected, found = _both(checks, scope, "Patient", {"entry": []})
    assert [i.rule for i in found] == ["r/binding", "r/binding", "r/card", "r/pattern", "r/pattern"]
    assert found == expected


@pytest.mark.parametrize("pid", profile_ids())
def test_plan_agrees_with_the_checks_one_by_one(pid: str) -> None:
    rs = ruleset()
    cases = [(full_bundle(pid), None), *((full_bundle(c.profile), c) for c in broken_cases(pid))]
    for (bundle, i), case in cases:
        if case is not None:
            case.mutate(bundle)
        resource = bundle["entry"][i]["resource"]
        at = f"Bundle.entry[{i}].resource"
        for checks in (rs.base.get(resource["resourceType"], []), _claimed(resource).checks):
            expected, found = _both(checks, resource, at, bundle)
            assert found == expected, case.rule if case else "valid"


def _claimed(resource: dict[str, Any]) -> Any:
    url = resource["meta"]["profile"][0]
    return ruleset().profiles.get(url) or ruleset().others[url]
