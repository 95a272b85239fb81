"""validate_bundle(): one failing case per rule (severity, rule, exact FHIRPath), valid Bundles, fuzzing."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.core.outcome import Issue, has_errors
from services.validator.logic import iter_references, reference_targets, resource_class, validate_bundle
from tests.fixtures.tddui import make_bundle

# make_bundle(8): 0 Organization, 1 Patient (INS), 2 Encounter séjour, 3 Encounter événement,
# 4 Practitioner, 5 PractitionerRole, 6 DocumentReference, 7 RelatedPerson.
BASE_SIZE = 8
MISSING_URN = "urn:uuid:00000000-0000-4000-8000-000000000000"

Mutation = Callable[[dict[str, Any]], Any]


def res(i: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda b: b["entry"][i]["resource"]


def setter(where: Callable[[dict[str, Any]], dict[str, Any]], key: str, value: Any) -> Mutation:
    def mutate(b: dict[str, Any]) -> None:
        where(b)[key] = value

    return mutate


def deleter(where: Callable[[dict[str, Any]], dict[str, Any]], key: str) -> Mutation:
    def mutate(b: dict[str, Any]) -> None:
        del where(b)[key]

    return mutate


def replace_body(body: Any) -> Mutation:
    """The whole payload becomes `body` (bytes or a decoded JSON value)."""
    return lambda b: body


def entry(i: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda b: b["entry"][i]


def copy_full_url(src: int, dst: int) -> Mutation:
    def mutate(b: dict[str, Any]) -> None:
        b["entry"][dst]["fullUrl"] = b["entry"][src]["fullUrl"]

    return mutate


def add_attachment_ext(reference: str) -> Mutation:
    def mutate(b: dict[str, Any]) -> None:
        ext = {
            "url": "https://interop.esante.gouv.fr/ig/fhir/tddui/StructureDefinition/tddui-attachment",
            "valueReference": {"reference": reference},
        }
        b["entry"][3]["resource"]["extension"].append(ext)

    return mutate


RULE_CASES = [
    # (mutation, severity, code, rule, expression)
    pytest.param(replace_body(b"{not json"), "error", "structure", "fhir-json", "Bundle", id="json-syntax"),
    pytest.param(replace_body(b"\xff\xfe"), "error", "structure", "fhir-json", "Bundle", id="json-not-utf8"),
    pytest.param(replace_body([1, 2]), "error", "structure", "fhir-not-bundle", "Bundle", id="json-array"),
    pytest.param(replace_body(b"null"), "error", "structure", "fhir-not-bundle", "Bundle", id="json-null"),
    pytest.param(
        setter(lambda b: b, "resourceType", "Patient"),
        "error",
        "structure",
        "fhir-not-bundle",
        "Bundle.resourceType",
        id="not-a-bundle",
    ),
    pytest.param(
        deleter(lambda b: b, "resourceType"),
        "error",
        "structure",
        "fhir-not-bundle",
        "Bundle.resourceType",
        id="no-resource-type",
    ),
    pytest.param(
        setter(lambda b: b, "type", "batch"),
        "error",
        "value",
        "tddui-bundle-type",
        "Bundle.type",
        id="type-batch",
    ),
    pytest.param(
        deleter(lambda b: b, "type"), "error", "structure", "fhir-structure", "Bundle.type", id="type-missing"
    ),
    pytest.param(
        setter(lambda b: b, "timestamp", "yesterday"),
        "error",
        "structure",
        "fhir-structure",
        "Bundle.timestamp",
        id="bundle-element-format",
    ),
    pytest.param(
        lambda b: res(1)(b)["identifier"][0].update(system=1234),
        "error",
        "structure",
        "fhir-r4/json-type",
        "Bundle.entry[1].resource.identifier[0].system",
        id="wrong-json-type",
    ),
    pytest.param(
        setter(res(0), "bogus", True),
        "error",
        "structure",
        "fhir-structure",
        "Bundle.entry[0].resource.bogus",
        id="unknown-element",
    ),
    pytest.param(
        deleter(res(2), "class"),
        "error",
        "structure",
        "fhir-structure",
        "Bundle.entry[2].resource.class",
        id="required-element",
    ),
    pytest.param(
        setter(res(1), "_birthDate", {"extension": [{"url": "x", "valuePositiveInt": 0}]}),
        "error",
        "structure",
        "fhir-structure",
        "Bundle.entry[1].resource.birthDate.extension[0].valuePositiveInt",
        id="primitive-extension",
    ),
    pytest.param(
        setter(entry(3), "resource", {"resourceType": "Foo"}),
        "error",
        "not-supported",
        "fhir-resource-type",
        "Bundle.entry[3].resource.resourceType",
        id="unknown-resource-type",
    ),
    pytest.param(
        setter(entry(3), "resource", {"resourceType": "PatientContact"}),
        "error",
        "not-supported",
        "fhir-resource-type",
        "Bundle.entry[3].resource.resourceType",
        id="backbone-as-resource",
    ),
    pytest.param(
        deleter(res(3), "resourceType"),
        "error",
        "required",
        "fhir-resource-type",
        "Bundle.entry[3].resource.resourceType",
        id="resource-type-missing",
    ),
    pytest.param(
        setter(res(3), "resourceType", 7),
        "error",
        "structure",
        "fhir-resource-type",
        "Bundle.entry[3].resource.resourceType",
        id="resource-type-not-string",
    ),
    pytest.param(
        setter(res(4), "contained", [{"resourceType": "Foo", "id": "c"}]),
        "error",
        "not-supported",
        "fhir-resource-type",
        "Bundle.entry[4].resource.contained[0].resourceType",
        id="contained-unknown-type",
    ),
    pytest.param(
        setter(entry(3), "resource", ["not", "an", "object"]),
        "error",
        "structure",
        "fhir-structure",
        "Bundle.entry[3].resource",
        id="resource-not-object",
    ),
    pytest.param(
        lambda b: b["entry"].__setitem__(3, 5),
        "error",
        "structure",
        "fhir-structure",
        "Bundle.entry[3]",
        id="entry-not-object",
    ),
    pytest.param(
        deleter(entry(3), "request"),
        "error",
        "required",
        "tddui-bundle-entry-request",
        "Bundle.entry[3].request",
        id="request-missing",
    ),
    pytest.param(
        lambda b: b["entry"][3]["request"].update(method="PUT"),
        "error",
        "value",
        "tddui-bundle-request-method",
        "Bundle.entry[3].request.method",
        id="method-put",
    ),
    pytest.param(
        deleter(entry(3), "resource"),
        "error",
        "required",
        "tddui-bundle-entry-resource",
        "Bundle.entry[3].resource",
        id="resource-missing",
    ),
    pytest.param(
        copy_full_url(1, 4),
        "error",
        "invalid",
        "tddui-bundle-fullurl-unique",
        "Bundle.entry[4].fullUrl",
        id="duplicate-fullurl",
    ),
    pytest.param(
        lambda b: b["entry"][1]["request"].update(url="TDDUIPatientINS"),
        "warning",
        "value",
        "tddui-bundle-request-url",
        "Bundle.entry[1].request.url",
        id="request-url-profile-name",
    ),
    pytest.param(
        lambda b: b["entry"][1]["request"].update(url="Observation"),
        "warning",
        "value",
        "tddui-bundle-request-url",
        "Bundle.entry[1].request.url",
        id="request-url-other-type",
    ),
    pytest.param(
        setter(res(2), "subject", {"reference": MISSING_URN}),
        "error",
        "not-found",
        "tddui-bundle-ref-urn",
        "Bundle.entry[2].resource.subject.reference",
        id="ref-urn-uuid",
    ),
    pytest.param(
        setter(res(2), "subject", {"reference": "urn:oid:1.2.3.4"}),
        "error",
        "not-found",
        "tddui-bundle-ref-urn",
        "Bundle.entry[2].resource.subject.reference",
        id="ref-urn-oid",
    ),
    pytest.param(
        setter(res(2), "hospitalization", {"origin": {"reference": MISSING_URN}}),
        "error",
        "not-found",
        "tddui-bundle-ref-urn",
        "Bundle.entry[2].resource.hospitalization.origin.reference",
        id="ref-in-backbone",
    ),
    pytest.param(
        add_attachment_ext(MISSING_URN),
        "error",
        "not-found",
        "tddui-bundle-ref-urn",
        "Bundle.entry[3].resource.extension[2].valueReference.reference",
        id="ref-in-extension",
    ),
    pytest.param(
        setter(
            res(1), "_birthDate", {"extension": [{"url": "x", "valueReference": {"reference": MISSING_URN}}]}
        ),
        "error",
        "not-found",
        "tddui-bundle-ref-urn",
        "Bundle.entry[1].resource.birthDate.extension[0].valueReference.reference",
        id="ref-in-primitive-extension",
    ),
    pytest.param(
        setter(
            res(5),
            "contained",
            [{"resourceType": "Location", "id": "l1", "managingOrganization": {"reference": MISSING_URN}}],
        ),
        "error",
        "not-found",
        "tddui-bundle-ref-urn",
        "Bundle.entry[5].resource.contained[0].managingOrganization.reference",
        id="ref-in-contained",
    ),
    pytest.param(
        setter(res(5), "practitioner", {"reference": "Practitioner/absent"}),
        "warning",
        "not-found",
        "tddui-bundle-ref-relative",
        "Bundle.entry[5].resource.practitioner.reference",
        id="ref-relative",
    ),
    pytest.param(
        setter(res(5), "practitioner", {"reference": "Practitioner/absent/_history/2"}),
        "warning",
        "not-found",
        "tddui-bundle-ref-relative",
        "Bundle.entry[5].resource.practitioner.reference",
        id="ref-relative-history",
    ),
    pytest.param(
        setter(res(5), "practitioner", {"reference": "https://elsewhere.example/fhir/Practitioner/1"}),
        "warning",
        "not-found",
        "tddui-bundle-ref-absolute",
        "Bundle.entry[5].resource.practitioner.reference",
        id="ref-absolute",
    ),
    pytest.param(
        setter(res(5), "practitioner", {"reference": "not a reference"}),
        "error",
        "value",
        "tddui-bundle-ref-format",
        "Bundle.entry[5].resource.practitioner.reference",
        id="ref-format",
    ),
    pytest.param(
        setter(res(5), "practitioner", {"reference": "Foo/1"}),
        "error",
        "value",
        "tddui-bundle-ref-format",
        "Bundle.entry[5].resource.practitioner.reference",
        id="ref-unknown-type",
    ),
]


def run(mutation: Mutation, **bundle_args: Any) -> list[Issue]:
    bundle = make_bundle(BASE_SIZE, **bundle_args)
    replaced = mutation(bundle)
    return validate_bundle(bundle if replaced is None else replaced)


@pytest.mark.parametrize(("mutation", "severity", "code", "rule", "expression"), RULE_CASES)
def test_each_rule_reports_its_failure(
    mutation: Mutation, severity: str, code: str, rule: str, expression: str
) -> None:
    issues = run(mutation)
    found = [(i.severity, i.code, i.rule, i.expression) for i in issues]
    assert (severity, code, rule, (expression,)) in found
    assert all(i.diagnostics for i in issues)


@pytest.mark.parametrize(("mutation", "severity", "code", "rule", "expression"), RULE_CASES)
def test_rule_fires_alone_where_it_should(
    mutation: Mutation, severity: str, code: str, rule: str, expression: str
) -> None:
    # Each case breaks one thing; no other rule should fire on the same spot twice.
    issues = run(mutation)
    at_spot = [i for i in issues if i.expression == (expression,)]
    assert len(at_spot) == 1, at_spot


def test_duplicate_full_url_names_the_other_entry() -> None:
    (issue,) = [i for i in run(copy_full_url(1, 4)) if i.rule == "tddui-bundle-fullurl-unique"]
    assert "Bundle.entry[1]" in issue.diagnostics


def test_request_url_warning_says_how_to_fix() -> None:
    issues = run(lambda b: b["entry"][1]["request"].update(url="TDDUIPatientINS"))
    assert [i.diagnostics for i in issues] == [
        "request.url 'TDDUIPatientINS' is not a resource type; a create must POST to 'Patient'"
        " — Relais repairs this before delivery."
    ]


def test_every_failure_is_reported_not_just_the_first() -> None:
    def break_three(b: dict[str, Any]) -> None:
        b["entry"][0]["resource"]["bogus"] = 1
        b["entry"][3]["resource"]["resourceType"] = "Foo"
        b["entry"][6]["resource"]["status"] = 5

    expressions = {i.expression[0] for i in run(break_three) if i.is_error}
    assert expressions == {
        "Bundle.entry[0].resource.bogus",
        "Bundle.entry[3].resource.resourceType",
        "Bundle.entry[6].resource.status",
    }


def test_several_errors_in_one_resource_are_each_located() -> None:
    def break_patient(b: dict[str, Any]) -> None:
        patient = b["entry"][1]["resource"]
        patient["identifier"][0]["system"] = 1
        patient["identifier"][1]["value"] = ["x"]
        patient["gender"] = 3

    issues = run(break_patient)
    expressions = {i.expression[0] for i in issues}
    # The INS identifier lost its system, so FR Core's fr-core-1 (VALI needs an INS) fails too.
    assert expressions == {
        "Bundle.entry[1].resource.identifier[0].system",
        "Bundle.entry[1].resource.identifier[1].value",
        "Bundle.entry[1].resource.gender",
        "Bundle.entry[1].resource",
    }
    assert [i.rule for i in issues if i.expression == ("Bundle.entry[1].resource",)] == [
        "tddui-patient-ins/inv/fr-core-1"
    ]


@pytest.mark.parametrize(
    "mutation",
    [
        pytest.param(
            lambda b: res(5)(b).update(contained=[{"resourceType": "Location", "id": "l1", "name": "Salle TEST"}],
                                       location=[{"reference": "#l1"}]),
            id="contained-referenced",
        ),
        pytest.param(lambda b: b["entry"][1]["resource"].update(id="p1"), id="resource-id-is-harmless"),
    ],
)
def test_harmless_changes_raise_nothing(mutation: Mutation) -> None:
    assert run(mutation) == []


def test_relative_reference_resolves_by_type_and_id() -> None:
    def point_relative(b: dict[str, Any]) -> None:
        b["entry"][4]["resource"]["id"] = "pract-1"
        b["entry"][5]["resource"]["practitioner"] = {"reference": "Practitioner/pract-1/_history/3"}

    # Resolved; the one note left says Relais will make the link portable before delivery.
    assert [(i.rule, i.expression) for i in run(point_relative)] == [
        ("tddui-bundle-ref-portable", ("Bundle.entry[5].resource.practitioner.reference",))]


def test_relative_reference_resolves_by_full_url_tail() -> None:
    def point_relative(b: dict[str, Any]) -> None:
        b["entry"][4]["fullUrl"] = "https://dui.example/fhir/Practitioner/pract-1"
        b["entry"][4]["resource"]["id"] = "pract-1"  # a RESTful fullUrl names its resource's id (R4)
        b["entry"][5]["resource"]["practitioner"] = {"reference": "Practitioner/pract-1"}

    assert [(i.rule, i.expression) for i in run(point_relative)] == [
        ("tddui-bundle-ref-portable", ("Bundle.entry[5].resource.practitioner.reference",))]


def test_absolute_reference_resolves_by_full_url() -> None:
    def point_absolute(b: dict[str, Any]) -> None:
        b["entry"][4]["fullUrl"] = "https://dui.example/fhir/Practitioner/pract-1"
        b["entry"][4]["resource"]["id"] = "pract-1"
        b["entry"][5]["resource"]["practitioner"] = {
            "reference": "https://dui.example/fhir/Practitioner/pract-1"
        }

    assert [(i.rule, i.expression) for i in run(point_absolute)] == [
        ("tddui-bundle-ref-portable", ("Bundle.entry[5].resource.practitioner.reference",))]


# --- valid Bundles -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [2, 3, 4, 10, 26, 27, 30, 53, 100, 300])
@pytest.mark.parametrize("seed", [0, 1, 987654321])
@pytest.mark.parametrize("patient_ins", [True, False])
def test_factory_bundles_are_clean(size: int, seed: int, patient_ins: bool) -> None:
    bundle = make_bundle(size, seed=seed, patient_ins=patient_ins)
    assert validate_bundle(orjson.dumps(bundle)) == []


@pytest.mark.parametrize("size", [2, 30, 300])
def test_published_style_only_warns_about_what_relais_repairs(size: int) -> None:
    issues = validate_bundle(make_bundle(size, seed=5, published_style=True))
    assert not has_errors(issues)
    url_issues = [i for i in issues if i.rule == "tddui-bundle-request-url"]
    assert [i.expression[0] for i in url_issues] == [f"Bundle.entry[{n}].request.url" for n in range(size)]
    # Entries linked by absolute fullUrl / Type/id: one warning for the whole Bundle, at the first link.
    portable = [i for i in issues if i.rule == "tddui-bundle-ref-portable"]
    links = size > 2  # two entries (Organization, Patient) do not refer to each other
    assert len(portable) == (1 if links else 0)
    for issue in portable:
        assert issue.severity == "warning" and "urn:uuid" in issue.diagnostics
        assert issue.expression[0].startswith("Bundle.entry[") and issue.expression[0].endswith(".reference")
    assert len(issues) == size + len(portable)


def test_urn_uuid_bundles_get_no_portability_warning() -> None:
    assert not [i for i in validate_bundle(make_bundle(30, seed=5)) if i.rule == "tddui-bundle-ref-portable"]


def test_bytes_and_dict_give_the_same_answer() -> None:
    bundle = make_bundle(30, seed=2)
    bundle["entry"][5]["resource"]["practitioner"] = {"reference": MISSING_URN}
    assert validate_bundle(bundle) == validate_bundle(orjson.dumps(bundle))
    assert validate_bundle(bundle) == validate_bundle(orjson.dumps(bundle).decode())


def test_input_is_not_modified() -> None:
    bundle = make_bundle(30, seed=2)
    bundle["entry"][3]["resource"]["resourceType"] = "Foo"
    before = copy.deepcopy(bundle)
    validate_bundle(bundle)
    assert bundle == before


# --- helpers -----------------------------------------------------------------------------------------


def test_reference_targets_index_full_urls_and_type_ids() -> None:
    bundle = make_bundle(3, published_style=True)
    targets = reference_targets(bundle)
    for i, e in enumerate(bundle["entry"]):
        assert targets[e["fullUrl"]] == i
        assert targets[f"{e['resource']['resourceType']}/{e['resource']['id']}"] == i
    assert len(targets) == 6


def test_iter_references_walks_in_document_order() -> None:
    resource = {
        "subject": {"reference": "a"},
        "extension": [
            {"valueReference": {"reference": "b"}},
            {"extension": [{"valueReference": {"reference": "c"}}]},
        ],
        "_status": {"extension": [{"valueReference": {"reference": "d"}}]},
        "reference": 5,
    }
    assert list(iter_references(resource, "X")) == [
        ("X.subject.reference", "a"),
        ("X.extension[0].valueReference.reference", "b"),
        ("X.extension[1].extension[0].valueReference.reference", "c"),
        ("X.status.extension[0].valueReference.reference", "d"),
    ]


def test_iter_references_survives_hostile_depth() -> None:
    deep: dict[str, Any] = {"reference": "x"}
    for _ in range(20_000):
        deep = {"a": [deep]}
    assert len(list(iter_references(deep, "X"))) == 1


@pytest.mark.parametrize(
    ("name", "is_resource"),
    [
        ("Patient", True),
        ("Bundle", True),
        ("Basic", True),
        ("PatientContact", False),
        ("Reference", False),
        ("Resource", False),
        ("DomainResource", False),
        ("patient", False),
        ("", False),
        ("Foo", False),
    ],
)
def test_resource_class_knows_only_concrete_resources(name: str, is_resource: bool) -> None:
    assert (resource_class(name) is not None) is is_resource


# --- never raises ------------------------------------------------------------------------------------

_VOCAB = [
    "resourceType",
    "entry",
    "resource",
    "request",
    "method",
    "url",
    "fullUrl",
    "reference",
    "type",
    "contained",
    "id",
    "identifier",
    "extension",
    "valueReference",
    "_birthDate",
    "subject",
]
_STRINGS = [
    "Bundle",
    "transaction",
    "POST",
    "Patient",
    "Foo",
    "Patient/1",
    "urn:uuid:1",
    "urn:oid:1.2",
    "#c",
    "https://x/Patient/1",
    "",
    "TDDUIPatient",
    "Resource",
    "PatientContact",
]
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(_STRINGS)
)
json_values = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.sampled_from(_VOCAB) | st.text(max_size=10), children, max_size=6)
    ),
    max_leaves=40,
)
FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def _assert_well_formed(issues: list[Issue]) -> None:
    for issue in issues:
        assert issue.rule and issue.diagnostics
        assert len(issue.expression) == 1 and issue.expression[0].startswith("Bundle")


@FUZZ
@given(json_values)
def test_arbitrary_json_never_raises(value: Any) -> None:
    _assert_well_formed(validate_bundle(value))
    _assert_well_formed(validate_bundle(orjson.dumps(value)))


@FUZZ
@given(st.dictionaries(st.sampled_from(_VOCAB), json_values, max_size=6), st.lists(json_values, max_size=4))
def test_arbitrary_bundle_shaped_json_never_raises(extra: dict[str, Any], entries: list[Any]) -> None:
    _assert_well_formed(validate_bundle({**extra, "resourceType": "Bundle", "entry": entries}))


def _mutate(data: st.DataObject, node: Any) -> None:
    """Walk down a random path and replace, delete or retype what is there."""
    parent, key = None, None
    while isinstance(node, dict | list) and node and data.draw(st.integers(0, 4)) > 0:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        parent, key = node, data.draw(st.sampled_from(keys))
        node = node[key]
    if parent is None:
        return
    action = data.draw(st.sampled_from(["replace", "delete", "string"]))
    if action == "delete" and isinstance(parent, dict):
        del parent[key]
    elif action == "string":
        parent[key] = data.draw(st.sampled_from(_STRINGS))
    else:
        parent[key] = data.draw(json_values)


@FUZZ
@given(st.data(), st.integers(2, 30), st.integers(0, 10), st.booleans())
def test_mutated_valid_bundles_never_raise(
    data: st.DataObject, size: int, seed: int, published: bool
) -> None:
    bundle = make_bundle(size, seed=seed, published_style=published)
    for _ in range(data.draw(st.integers(1, 5))):
        _mutate(data, bundle)
    _assert_well_formed(validate_bundle(bundle))
