"""Routing: the named targets the directory knows and has enabled, or issues saying why not."""

from __future__ import annotations

import pytest

from services.core.targets import Target, TargetDirectory
from services.router.logic import delivery_key, route

DIRECTORY = TargetDirectory(targets=[
    Target(id="essms-a", base_url="http://a.example/fhir"),
    Target(id="sidoba", base_url="https://sidoba.example/fhir"),
    Target(id="paused", base_url="http://paused.example/fhir", enabled=False),
])


@pytest.mark.parametrize(("named", "targets", "issues"), [
    pytest.param(["essms-a"], ("essms-a",), [], id="one-known"),
    pytest.param(["sidoba", "essms-a"], ("sidoba", "essms-a"), [], id="known-order-kept"),
    pytest.param(["nowhere"], (), [("not-found", "relais-route-unknown-target", "nowhere")], id="unknown"),
    pytest.param(["essms-a", "nowhere"], (), [("not-found", "relais-route-unknown-target", "nowhere")],
                 id="known-and-unknown"),
    pytest.param(["paused"], (), [("processing", "relais-route-disabled-target", "paused")], id="disabled"),
    pytest.param(["essms-a", "paused"], (), [("processing", "relais-route-disabled-target", "paused")],
                 id="known-and-disabled"),
    pytest.param(["x", "paused"], (), [("not-found", "relais-route-unknown-target", "'x'"),
                                       ("processing", "relais-route-disabled-target", "paused")],
                 id="unknown-and-disabled"),
    pytest.param([], (), [("required", "relais-route-no-target", "X-Relais-Target")], id="none"),
])
def test_route(named: list[str], targets: tuple[str, ...], issues: list[tuple[str, str, str]]) -> None:
    routing = route(named, DIRECTORY)
    assert routing.targets == targets
    assert [(i.code, i.rule) for i in routing.issues] == [(code, rule) for code, rule, _ in issues]
    for issue, (_, _, mention) in zip(routing.issues, issues, strict=True):
        assert issue.is_error
        assert mention in issue.diagnostics


def test_route_on_an_empty_directory_refuses_every_target() -> None:
    routing = route(["essms-a"], TargetDirectory())
    assert routing.targets == ()
    assert [i.rule for i in routing.issues] == ["relais-route-unknown-target"]


@pytest.mark.parametrize(("target", "subject", "transfer_id", "key"), [
    ("essms-a", "0123456789abcdef", "tr-1", b"essms-a|0123456789abcdef"),
    ("essms-a", None, "tr-1", b"essms-a|tr-1"),
    ("essms-a", "", "tr-1", b"essms-a|tr-1"),
    ("sidoba", "0123456789abcdef", "tr-2", b"sidoba|0123456789abcdef"),
])
def test_delivery_key(target: str, subject: str | None, transfer_id: str, key: bytes) -> None:
    assert delivery_key(target, subject, transfer_id) == key


def test_one_persons_exports_share_a_key_per_target_and_targets_do_not() -> None:
    assert delivery_key("essms-a", "s1", "tr-1") == delivery_key("essms-a", "s1", "tr-2")
    assert delivery_key("essms-a", "s1", "tr-1") != delivery_key("sidoba", "s1", "tr-1")
    assert delivery_key("essms-a", None, "tr-1") != delivery_key("essms-a", None, "tr-2")


# --- routing rules ---------------------------------------------------------------------------------

from services.router.logic import TransferInfo, transfer_info  # noqa: E402
from tests.fixtures.tddui import make_bundle, organization_finess  # noqa: E402

RULED = TargetDirectory.model_validate({
    "targets": [{"id": "essms-a", "base_url": "http://a/fhir"}, {"id": "stats", "base_url": "http://s/fhir"},
                {"id": "ars", "base_url": "http://ars/fhir"}, {"id": "off", "base_url": "http://o/fhir",
                                                                 "enabled": False}],
    "routes": [
        {"id": "sejour-stats", "when": {"profiles": ["tddui-encounter-sejour"]}, "add": ["stats"]},
        {"id": "dui-b-ars", "when": {"producers": ["dui-b"]}, "add": ["ars"]},
        {"id": "finess-ars", "when": {"finess": ["990000001"], "producers": ["dui-a"]}, "add": ["ars", "off"]},
    ],
})
SEJOUR = "https://interop.esante.gouv.fr/ig/fhir/tddui/StructureDefinition/tddui-encounter-sejour"


@pytest.mark.parametrize(("info", "targets", "added"), [
    pytest.param(TransferInfo(("essms-a",), "dui-a"), ("essms-a",), (), id="no-rule-applies"),
    pytest.param(TransferInfo(("essms-a",), "dui-a", profiles=frozenset({SEJOUR})), ("essms-a", "stats"),
                 (("stats", "sejour-stats"),), id="profile-by-canonical"),
    pytest.param(TransferInfo((), "dui-x", profiles=frozenset({SEJOUR + "|1.0"})), ("stats",),
                 (("stats", "sejour-stats"),), id="rule-alone-is-enough"),
    pytest.param(TransferInfo(("essms-a",), "dui-b"), ("essms-a", "ars"), (("ars", "dui-b-ars"),), id="producer"),
    pytest.param(TransferInfo(("essms-a",), "dui-a", finess=frozenset({"990000001"})), ("essms-a", "ars"),
                 (("ars", "finess-ars"),), id="finess-and-producer-disabled-skipped"),
    pytest.param(TransferInfo(("essms-a",), "dui-b", finess=frozenset({"990000001"})), ("essms-a", "ars"),
                 (("ars", "dui-b-ars"),), id="all-conditions-must-match"),
    pytest.param(TransferInfo(("ars",), "dui-b"), ("ars",), (), id="named-and-added-once"),
])
def test_route_rules(info: TransferInfo, targets: tuple[str, ...], added: tuple[tuple[str, str], ...]) -> None:
    routing = route(info, RULED)
    assert routing.issues == ()
    assert routing.targets == targets
    assert routing.added_by == added


def test_no_target_and_no_rule_is_rejected_with_an_outcome() -> None:
    routing = route(TransferInfo((), "dui-x"), RULED)
    assert routing.targets == ()
    assert [i.rule for i in routing.issues] == ["relais-route-no-target"]


def test_unknown_named_target_rejects_even_when_rules_add_others() -> None:
    routing = route(TransferInfo(("nowhere",), "dui-b"), RULED)
    assert routing.targets == () and routing.issues[0].rule == "relais-route-unknown-target"


def test_transfer_info_reads_profiles_and_the_organization_finess() -> None:
    bundle = make_bundle(8, seed=3)
    info = transfer_info(bundle, ["essms-a"], "dui-a")
    assert info.finess == {organization_finess(bundle)}
    assert SEJOUR in info.profiles
    assert info.named == ("essms-a",) and info.producer == "dui-a"


@pytest.mark.parametrize("junk", [None, [], "x", {"entry": "x"}, {"entry": [1, {"resource": 2}]}])
def test_transfer_info_ignores_junk(junk: object) -> None:
    assert transfer_info(junk, [], None) == TransferInfo((), None)
