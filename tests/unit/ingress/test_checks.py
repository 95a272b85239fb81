"""Ingress door checks: each refusal's HTTP status, issue code, rule and FHIRPath expression."""

from __future__ import annotations

import hashlib

import orjson
import pytest

from services.core.targets import Target, TargetDirectory
from services.http.auth import bearer_token
from services.ingress.checks import (
    Refusal,
    all_issues,
    check_content_type,
    check_declared_length,
    check_targets,
    parse_bundle,
    too_large,
    unauthenticated,
)
from services.ingress.producers import Producer

DIRECTORY = TargetDirectory(targets=[
    Target(id="essms-a", base_url="http://a.example/fhir"),
    Target(id="essms-b", base_url="http://b.example/fhir"),
    Target(id="sidoba", base_url="https://sidoba.example/fhir"),
])
HASH = hashlib.sha256(b"token").hexdigest()
ANY_TARGET = Producer(id="dui-any", token_sha256=HASH)
RESTRICTED = Producer(id="dui-restricted", token_sha256=HASH, targets=frozenset({"essms-a"}))


def assert_refusal(result: object, status: int, code: str, expression: list[str] | None = None,
                   rule: str | None = None) -> Refusal:
    assert isinstance(result, Refusal), f"expected a {status} refusal, got {result!r}"
    assert result.status == status
    assert len(result.issues) == 1
    issue = result.issues[0]
    assert issue.severity == "error"
    assert issue.code == code
    assert issue.diagnostics
    assert list(issue.expression) == (expression or [])
    if rule is not None:
        assert issue.rule == rule
    return result


# --- Content-Type --------------------------------------------------------------------------------

@pytest.mark.parametrize("content_type", [
    "application/fhir+json",
    "application/json",
    "application/fhir+json; charset=utf-8",
    "application/fhir+json;charset=UTF-8",
    "application/json; charset=utf-8; fhirVersion=4.0",
    "Application/FHIR+JSON",
    "  application/fhir+json  ",
])
def test_content_type_accepted(content_type: str) -> None:
    assert check_content_type(content_type) is None


@pytest.mark.parametrize(("content_type", "shown"), [
    (None, "(none)"),
    ("", "(none)"),
    ("application/fhir+xml", "application/fhir+xml"),
    ("text/plain; charset=utf-8", "text/plain; charset=utf-8"),
    ("application/x-www-form-urlencoded", "application/x-www-form-urlencoded"),
    ("application/fhir+json-patch", "application/fhir+json-patch"),
    ("; charset=utf-8", "; charset=utf-8"),
])
def test_content_type_refused_with_415(content_type: str | None, shown: str) -> None:
    refusal = assert_refusal(check_content_type(content_type), 415, "not-supported",
                             rule="relais-ingress-content-type")
    assert shown in refusal.issues[0].diagnostics


# --- Content-Length ------------------------------------------------------------------------------

@pytest.mark.parametrize(("content_length", "refused"), [
    (None, False),
    ("", False),
    ("0", False),
    ("1000", False),
    ("1001", True),
    ("99999999999999999999", True),
    ("abc", False),   # not a number: the body's real size is checked when read
    ("-5", False),
    ("1e9", False),
])
def test_declared_length(content_length: str | None, refused: bool) -> None:
    result = check_declared_length(content_length, 1000)
    if refused:
        refusal = assert_refusal(result, 413, "too-costly", ["Bundle"], rule="relais-ingress-size")
        assert "1000" in refusal.issues[0].diagnostics
        assert "RELAIS_MAX_BODY_BYTES" in refusal.issues[0].diagnostics
    else:
        assert result is None


def test_too_large() -> None:
    assert_refusal(too_large(42), 413, "too-costly", ["Bundle"])


# --- the body ------------------------------------------------------------------------------------

TRANSACTION = {"resourceType": "Bundle", "type": "transaction", "entry": []}


@pytest.mark.parametrize(("body", "status", "code", "expression", "rule"), [
    pytest.param(b"", 400, "structure", [], "relais-ingress-json", id="empty"),
    pytest.param(b"{not json", 400, "structure", [], "relais-ingress-json", id="not-json"),
    pytest.param(b"\xff\xfe{}", 400, "structure", [], "relais-ingress-json", id="not-utf8"),
    pytest.param(b'[{"resourceType":"Bundle"}]', 400, "structure", [], "relais-ingress-bundle", id="array"),
    pytest.param(b'"Bundle"', 400, "structure", [], "relais-ingress-bundle", id="string"),
    pytest.param(b"null", 400, "structure", [], "relais-ingress-bundle", id="null"),
    pytest.param(b'{"resourceType":"Patient"}', 400, "structure", ["Bundle.resourceType"],
                 "relais-ingress-bundle", id="not-a-bundle"),
    pytest.param(b'{"type":"transaction"}', 400, "structure", ["Bundle"], "relais-ingress-bundle",
                 id="no-resource-type"),
    pytest.param(b'{"resourceType":"Bundle","type":"batch"}', 422, "value", ["Bundle.type"],
                 "relais-ingress-transaction", id="batch"),
    pytest.param(b'{"resourceType":"Bundle","type":"collection"}', 422, "value", ["Bundle.type"],
                 "relais-ingress-transaction", id="collection"),
    pytest.param(b'{"resourceType":"Bundle"}', 422, "value", ["Bundle.type"],
                 "relais-ingress-transaction", id="no-type"),
])
def test_parse_bundle_refusals(body: bytes, status: int, code: str, expression: list[str], rule: str) -> None:
    assert_refusal(parse_bundle(body), status, code, expression, rule)


def test_parse_bundle_names_the_wrong_resource_type() -> None:
    refusal = parse_bundle(b'{"resourceType":"Patient"}')
    assert isinstance(refusal, Refusal)
    assert "'Patient'" in refusal.issues[0].diagnostics


def test_parse_bundle_good_transaction() -> None:
    assert parse_bundle(orjson.dumps(TRANSACTION)) == TRANSACTION


# --- X-Relais-Target -----------------------------------------------------------------------------

@pytest.mark.parametrize(("header", "producer", "status", "code", "rule", "named"), [
    pytest.param(None, ANY_TARGET, 422, "required", "relais-ingress-target-missing", None, id="missing"),
    pytest.param("", ANY_TARGET, 422, "required", "relais-ingress-target-missing", None, id="empty"),
    pytest.param(" , ,", ANY_TARGET, 422, "required", "relais-ingress-target-missing", None, id="blanks"),
    pytest.param("essms-a,nowhere", ANY_TARGET, 422, "not-found", "relais-ingress-target-unknown",
                 "nowhere", id="unknown"),
    pytest.param("ESSMS-A", ANY_TARGET, 422, "not-found", "relais-ingress-target-unknown", "ESSMS-A",
                 id="ids-are-case-sensitive"),
    pytest.param("essms-a,essms-b", RESTRICTED, 403, "forbidden", "relais-ingress-target-forbidden",
                 "essms-b", id="forbidden"),
    pytest.param("nowhere,essms-b", RESTRICTED, 422, "not-found", "relais-ingress-target-unknown",
                 "nowhere", id="unknown-before-forbidden"),
])
def test_check_targets_refusals(header: str | None, producer: Producer, status: int, code: str, rule: str,
                                named: str | None) -> None:
    refusal = assert_refusal(check_targets(header, producer, DIRECTORY), status, code, rule=rule)
    if named:
        assert named in refusal.issues[0].diagnostics
    if status == 403:
        assert producer.id in refusal.issues[0].diagnostics


@pytest.mark.parametrize(("header", "producer", "expected"), [
    ("essms-a", ANY_TARGET, ["essms-a"]),
    (" essms-b , sidoba ,essms-b", ANY_TARGET, ["essms-b", "sidoba"]),
    ("essms-a", RESTRICTED, ["essms-a"]),
    ("essms-a, essms-a", RESTRICTED, ["essms-a"]),
])
def test_check_targets_ok(header: str, producer: Producer, expected: list[str]) -> None:
    assert check_targets(header, producer, DIRECTORY) == expected


# --- Authorization -------------------------------------------------------------------------------

@pytest.mark.parametrize(("authorization", "token"), [
    (None, None),
    ("", None),
    ("Bearer abc.def-123", "abc.def-123"),
    ("bearer abc", "abc"),
    ("BEARER abc", "abc"),
    ("Bearer   abc  ", "abc"),
    ("Bearer", None),
    ("Bearer ", None),
    ("Bearer    ", None),
    ("Basic dXNlcjpwYXNz", None),
    ("Token abc", None),
    ("abc", None),
])
def test_bearer_token(authorization: str | None, token: str | None) -> None:
    assert bearer_token(authorization) == token


def test_unauthenticated_is_a_401_with_a_bearer_challenge() -> None:
    refusal = assert_refusal(unauthenticated("no token"), 401, "login", rule="relais-ingress-auth")
    assert refusal.headers == {"WWW-Authenticate": 'Bearer realm="relais"'}
    assert refusal.issues[0].diagnostics == "no token"


def test_refusal_message_and_all_issues() -> None:
    a, b = too_large(10), unauthenticated("who?")
    assert str(a).startswith("413: ")
    assert [i.code for i in all_issues([a, b])] == ["too-costly", "login"]
    assert all_issues([]) == []
