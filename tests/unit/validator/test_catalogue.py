"""Every profile of the rule files: a full and a minimal valid instance, and each rule kind broken."""

from __future__ import annotations

import pytest

from services.validator.logic import validate_bundle
from tests.fixtures.tddui_cases import Broken, broken_cases, full_bundle, minimal_bundle, profile_ids

PROFILES = profile_ids()
CASES = [case for pid in PROFILES for case in broken_cases(pid)]


@pytest.mark.parametrize("pid", PROFILES)
def test_full_instance_is_valid(pid: str) -> None:
    bundle, _ = full_bundle(pid)
    assert validate_bundle(bundle) == []


@pytest.mark.parametrize("pid", PROFILES)
def test_minimal_instance_is_valid(pid: str) -> None:
    bundle, _ = minimal_bundle(pid)
    assert validate_bundle(bundle) == []


@pytest.mark.parametrize("case", CASES, ids=str)
def test_broken_instance_fails_with_rule_and_expression(case: Broken) -> None:
    bundle, _ = full_bundle(case.profile)
    case.mutate(bundle)
    issues = validate_bundle(bundle)
    found = [(i.rule, i.expression[0] if i.expression else None) for i in issues]
    assert (case.fires or case.rule, case.expression) in found, found
