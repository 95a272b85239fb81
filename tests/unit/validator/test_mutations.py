"""Property tests: valid Bundles, broken on purpose (a required element dropped, a fixed or pattern value
changed, a code swapped, a reference broken), several edits at once: the engine reports each edit at
its location, and never raises whatever JSON value lands anywhere."""

from __future__ import annotations

import copy
import uuid
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.validator.bundle import iter_references
from services.validator.logic import validate_bundle
from tests.fixtures.tddui_cases import Broken, broken_cases, full_bundle, node_at, profile_ids

CASES = [case for pid in profile_ids() for case in broken_cases(pid)]
BY_KIND = {kind: [c for c in CASES if c.kind == kind] for kind in {c.kind for c in CASES}}
BASE, _ = full_bundle("tddui-patient-ins")  # the 29-entry factory Bundle most profiles live in
SAME_BUNDLE = [c for c in CASES if c.profile != "tddui-patient"]
REFERENCES = [(path, ref) for i, e in enumerate(BASE["entry"])
              for path, ref in iter_references(e["resource"], f"Bundle.entry[{i}].resource")]

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _entry_of(case: Broken) -> str:
    return case.expression.split(".resource", 1)[0]


def _reported(bundle: dict[str, Any]) -> set[tuple[str | None, str | None]]:
    return {(i.rule, i.expression[0] if i.expression else None) for i in validate_bundle(bundle)}


@FAST
@given(st.sampled_from(BY_KIND["card"]))
def test_dropping_a_required_element_is_reported_there(case: Broken) -> None:
    bundle, _ = full_bundle(case.profile)
    case.mutate(bundle)
    assert (case.fires or case.rule, case.expression) in _reported(bundle)


@FAST
@given(st.sampled_from(BY_KIND["pattern"] + BY_KIND.get("fixed", [])))
def test_changing_a_fixed_or_pattern_value_is_reported_there(case: Broken) -> None:
    bundle, _ = full_bundle(case.profile)
    case.mutate(bundle)
    assert (case.rule, case.expression) in _reported(bundle)


@FAST
@given(st.sampled_from(BY_KIND["binding"]))
def test_swapping_a_code_is_reported_there(case: Broken) -> None:
    bundle, _ = full_bundle(case.profile)
    case.mutate(bundle)
    assert (case.rule, case.expression) in _reported(bundle)


@FAST
@given(st.sampled_from(REFERENCES), st.uuids())
def test_a_dangling_reference_is_reported_there(where: tuple[str, str], new: uuid.UUID) -> None:
    path, _ = where
    bundle = copy.deepcopy(BASE)
    parent = node_at(bundle, path.removesuffix(".reference"))
    parent["reference"] = f"urn:uuid:{new}"
    issues = [i for i in validate_bundle(bundle) if i.is_error]
    assert ("tddui-bundle-ref-urn", path) in {(i.rule, i.expression[0]) for i in issues}


@FAST
@given(st.sampled_from(BY_KIND["targets"]))
def test_a_reference_to_the_wrong_kind_of_entry_is_reported_there(case: Broken) -> None:
    bundle, _ = full_bundle(case.profile)
    case.mutate(bundle)
    assert (case.fires or case.rule, case.expression) in _reported(bundle)  # base R4 says it first if it can


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(SAME_BUNDLE), min_size=2, max_size=5, unique_by=_entry_of))
def test_several_edits_in_one_bundle_are_each_reported(cases: list[Broken]) -> None:
    bundle = copy.deepcopy(BASE)
    for case in cases:
        case.mutate(bundle)
    reported = _reported(bundle)
    for case in cases:
        assert (case.fires or case.rule, case.expression) in reported, case


JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=8)),
    lambda kids: st.one_of(st.lists(kids, max_size=3), st.dictionaries(st.text(max_size=8), kids, max_size=3)),
    max_leaves=10,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(CASES), JSON)
def test_any_json_value_at_a_rule_location_never_crashes(case: Broken, value: Any) -> None:
    bundle, _ = full_bundle(case.profile)
    head, _, key = case.expression.rpartition(".")
    try:
        parent = node_at(bundle, head)
    except (KeyError, IndexError, TypeError):
        return
    if isinstance(parent, dict):
        parent[key.split("[")[0]] = value
    for issue in validate_bundle(bundle):
        assert issue.severity in ("fatal", "error", "warning", "information")
        assert issue.diagnostics and issue.code
        assert all(e.startswith("Bundle") for e in issue.expression)
