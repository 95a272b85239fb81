"""schemas/ describes what the code writes: the envelope schema accepts real envelopes, rejects broken ones."""

from __future__ import annotations

from datetime import UTC, datetime

from services.core.envelope import Envelope, event
from services.core.settings import Settings
from services.core.topics import declared_topics
from tests.support.schemas import asyncapi, envelope_validator


def decoded(env: Envelope) -> dict[str, str]:
    return {k: v.decode() for k, v in env.to_headers()}


def sample() -> Envelope:
    return Envelope(type="fr.relais.delivery.requested", source="/relais/router", transfer_id="t-1", data=b"{}",
                    producer="dui-a", target="essms-a", attempt=2, not_before=datetime.now(UTC),
                    extra={"targets": "essms-a", "subject": "0123456789abcdef"})


def test_real_envelopes_are_valid() -> None:
    validator = envelope_validator()
    assert not list(validator.iter_errors(decoded(sample())))
    assert not list(validator.iter_errors(decoded(event(sample(), "delivered", "delivery").envelope)))


def test_broken_envelopes_are_not() -> None:
    validator = envelope_validator()
    headers = decoded(sample())
    for broken in ({k: v for k, v in headers.items() if k != "ce_id"},
                   {**headers, "ce_specversion": "0.3"},
                   {**headers, "ce_type": "something.else"},
                   {**headers, "ce_attempt": "two"},
                   {**headers, "x-unknown": "1"},
                   {**headers, "ce_subject": "Jean DUPONT"}):
        assert list(validator.iter_errors(broken)), broken


def test_asyncapi_describes_every_declared_topic() -> None:
    addresses = {c["address"] for c in asyncapi()["channels"].values()}
    for spec in declared_topics(Settings()):
        name = "deliveries.retry.{tier}" if spec.name.startswith("deliveries.retry.") else spec.name
        assert name in addresses, spec.name
