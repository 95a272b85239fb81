"""`relais send`'s request key and verdict: what makes two requests the same, and what counts as success."""

from __future__ import annotations

from services.send import Outcome, Report, request_key


def test_the_key_is_the_ingress_the_targets_and_the_content() -> None:
    key = request_key("http://relais:8080", "a,b", b"{}")
    assert key == request_key("http://relais:8080/", " b , a", b"{}")  # same request, however written
    assert len({key, request_key("http://other:8080", "a,b", b"{}"), request_key("http://relais:8080", "a", b"{}"),
                request_key("http://relais:8080", "a,b", b"{ }")}) == 4


def test_success_is_acceptance_or_with_wait_delivery() -> None:
    accepted = Report([Outcome("f", "k", "accepted"), Outcome("g", "k", "skipped")])
    assert accepted.ok and "skipped (accepted with the same key in an earlier run): 1" in accepted.render()
    waited = Report([Outcome("f", "k", "delivered"), Outcome("g", "k", "dead-lettered", reason="HTTP 400")],
                    waited=True)
    assert not waited.ok
    assert waited.to_json()["dead-lettered"] == 1 and "dead-lettered g: - HTTP 400" in waited.render()
    assert not Report([Outcome("f", "k", "pending")], waited=True).ok
