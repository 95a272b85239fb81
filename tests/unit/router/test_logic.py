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
