"""The record envelope: CloudEvents Kafka binary binding, round trips, malformed records, events; and
schemas/envelope.schema.json describes what the code writes: it accepts real envelopes, rejects broken ones."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest

from services.core.envelope import (
    FHIR_JSON,
    JSON,
    Emit,
    Envelope,
    EnvelopeError,
    event,
    join_csv,
    split_csv,
)
from services.core.topics import EVENTS
from tests.support.schemas import envelope_validator

T0 = datetime(2025, 3, 14, 9, 26, 53, 589793, tzinfo=UTC)


def make_envelope(**overrides: object) -> Envelope:
    """An envelope with every field set; override any of them."""
    fields: dict[str, object] = {
        "type": "fr.relais.transfer.received",
        "source": "/relais/ingress",
        "transfer_id": "3f1c2a9e-0000-4000-8000-000000000001",
        "data": b'{"resourceType":"Bundle","type":"transaction"}',
        "producer": "dui-acme",
        "target": "essms-a",
        "attempt": 3,
        "not_before": T0 + timedelta(seconds=60),
        "id": "evt-1",
        "time": T0,
        "content_type": FHIR_JSON,
        "extra": {"subject": "0123456789abcdef", "firstfailure": T0.isoformat()},
    }
    fields.update(overrides)
    return Envelope(**fields)  # type: ignore[arg-type]


def headers_of(env: Envelope) -> dict[str, bytes]:
    pairs = env.to_headers()
    assert len({k for k, _ in pairs}) == len(pairs), "a header key appears twice"
    return dict(pairs)


def good_headers(**changes: bytes | None) -> list[tuple[str, bytes]]:
    """Minimal valid headers; a None value removes that header."""
    h: dict[str, bytes] = {
        "ce_specversion": b"1.0", "ce_id": b"evt-9", "ce_type": b"fr.relais.transfer.received",
        "ce_source": b"/relais/ingress", "ce_time": T0.isoformat().encode(),
        "content-type": b"application/fhir+json", "ce_transferid": b"tr-9", "ce_attempt": b"0",
    }
    for key, value in changes.items():
        key = key.replace("__", "-")
        if value is None:
            h.pop(key, None)
        else:
            h[key] = value
    return list(h.items())


# --- round trip ---------------------------------------------------------------------------------

@pytest.mark.parametrize("env", [
    pytest.param(make_envelope(), id="every-field"),
    pytest.param(make_envelope(producer=None, target=None, not_before=None, extra={}), id="optional-none"),
    pytest.param(make_envelope(attempt=0, content_type=JSON, data=b'{"kind":"accepted"}'), id="event-json"),
    pytest.param(make_envelope(time=datetime(2025, 1, 1, 12, tzinfo=timezone(timedelta(hours=2)))),
                 id="non-utc-offset"),
])
def test_to_headers_from_headers_round_trip(env: Envelope) -> None:
    back = Envelope.from_headers(env.to_headers(), env.data)
    assert back == env


def test_round_trip_keeps_none_producer_and_target_absent() -> None:
    env = make_envelope(producer=None, target=None, not_before=None)
    h = headers_of(env)
    assert "ce_producer" not in h and "ce_target" not in h and "ce_notbefore" not in h
    back = Envelope.from_headers(env.to_headers(), env.data)
    assert (back.producer, back.target, back.not_before) == (None, None, None)


def test_none_value_becomes_empty_data() -> None:
    assert Envelope.from_headers(good_headers(), None).data == b""


# --- the CloudEvents Kafka binding ---------------------------------------------------------------

@pytest.mark.parametrize(("header", "expected"), [
    ("ce_specversion", b"1.0"),
    ("ce_id", b"evt-1"),
    ("ce_type", b"fr.relais.transfer.received"),
    ("ce_source", b"/relais/ingress"),
    ("ce_time", T0.isoformat().encode()),
    ("content-type", b"application/fhir+json"),
    ("ce_transferid", b"3f1c2a9e-0000-4000-8000-000000000001"),
    ("ce_producer", b"dui-acme"),
    ("ce_target", b"essms-a"),
    ("ce_attempt", b"3"),
    ("ce_notbefore", (T0 + timedelta(seconds=60)).isoformat().encode()),
    ("ce_subject", b"0123456789abcdef"),
    ("ce_firstfailure", T0.isoformat().encode()),
])
def test_header_names_follow_the_binary_binding(header: str, expected: bytes) -> None:
    assert headers_of(make_envelope())[header] == expected


def test_every_header_is_bytes_and_content_type_is_not_a_ce_attribute() -> None:
    pairs = make_envelope().to_headers()
    assert all(isinstance(k, str) and isinstance(v, bytes) for k, v in pairs)
    keys = {k for k, _ in pairs}
    assert "ce_datacontenttype" not in keys
    # CloudEvents attribute names are lower-case alphanumerics after the ce_ prefix.
    assert all(k == "content-type" or (k.startswith("ce_") and k[3:].isalnum() and k[3:].islower())
               for k in keys)


def test_ce_time_is_an_rfc3339_timestamp_with_offset() -> None:
    raw = headers_of(make_envelope())["ce_time"].decode()
    parsed = datetime.fromisoformat(raw)
    assert parsed == T0 and parsed.utcoffset() is not None


def test_missing_optional_headers_get_defaults() -> None:
    before = datetime.now(UTC)
    env = Envelope.from_headers(good_headers(ce_time=None, ce_attempt=None, content__type=None), b"x")
    assert env.attempt == 0
    assert env.content_type == FHIR_JSON
    assert before <= env.time <= datetime.now(UTC)


def test_unknown_ce_headers_become_extras_and_other_headers_are_ignored() -> None:
    env = Envelope.from_headers(good_headers(ce_reason=b"HTTP 503", traceparent=b"00-abc"), b"")
    assert env.extra == {"reason": "HTTP 503"}


# --- malformed records --------------------------------------------------------------------------

@pytest.mark.parametrize("missing", ["ce_id", "ce_type", "ce_source", "ce_transferid"])
@pytest.mark.parametrize("how", ["absent", "empty"])
def test_missing_mandatory_header_raises(missing: str, how: str) -> None:
    headers = good_headers(**{missing: None if how == "absent" else b""})
    with pytest.raises(EnvelopeError, match=missing):
        Envelope.from_headers(headers, b"{}")


@pytest.mark.parametrize(("header", "value"), [
    ("ce_attempt", b"two"),
    ("ce_attempt", b"1.5"),
    ("ce_attempt", b""),
    ("ce_time", b"yesterday"),
    ("ce_time", b"2025-13-40T99:00:00Z"),
    ("ce_notbefore", b"soon"),
])
def test_malformed_attribute_raises(header: str, value: bytes) -> None:
    with pytest.raises(EnvelopeError, match="malformed"):
        Envelope.from_headers(good_headers(**{header: value}), b"{}")


@pytest.mark.parametrize("header", ["ce_id", "ce_producer", "ce_custom"])
def test_non_utf8_header_raises(header: str) -> None:
    with pytest.raises(EnvelopeError, match=header):
        Envelope.from_headers(good_headers(**{header: b"\xff\xfe"}), b"{}")


def test_none_header_value_raises() -> None:
    headers = [*good_headers(), ("ce_producer", None)]
    with pytest.raises(EnvelopeError, match="ce_producer"):
        Envelope.from_headers(headers, b"{}")  # type: ignore[arg-type]


@pytest.mark.parametrize(("header", "value"), [
    ("ce_time", b"2025-03-14T09:26:53"),        # no offset: not an RFC 3339 timestamp
    ("ce_time", b"2025-03-14"),                 # a date, not a timestamp
    ("ce_notbefore", b"2025-03-14T09:27:53"),   # the runner subtracts it from an aware "now"
])
def test_timestamps_without_offset_are_refused_or_made_aware(header: str, value: bytes) -> None:
    """A naive datetime must never come out of from_headers: comparing it with now(UTC) raises TypeError."""
    try:
        env = Envelope.from_headers(good_headers(**{header: value}), b"{}")
    except EnvelopeError:
        return
    moment = env.time if header == "ce_time" else env.not_before
    assert moment is not None and moment.tzinfo is not None, f"{header}={value!r} gave a naive datetime"


# --- evolve and events --------------------------------------------------------------------------

def test_evolve_gives_a_new_id_and_time_and_keeps_the_rest() -> None:
    env = make_envelope()
    nxt = env.evolve(attempt=4)
    assert nxt.id != env.id
    assert nxt.time > env.time
    assert nxt.attempt == 4
    assert (nxt.transfer_id, nxt.producer, nxt.target, nxt.data, nxt.extra) == (
        env.transfer_id, env.producer, env.target, env.data, env.extra)
    assert env.attempt == 3, "evolve must not change the original"


def test_evolve_twice_gives_distinct_ids_and_respects_explicit_id() -> None:
    env = make_envelope()
    assert env.evolve().id != env.evolve().id
    assert env.evolve(id="fixed").id == "fixed"


@pytest.mark.parametrize(("target", "expected_target"), [(None, "essms-a"), ("essms-b", "essms-b")])
def test_event_is_a_transfers_events_record_keyed_by_transfer_id(target: str | None,
                                                                 expected_target: str) -> None:
    src = make_envelope()
    emit = event(src, "retry_scheduled", "delivery", {"http_status": 503}, target=target)
    assert isinstance(emit, Emit)
    assert emit.topic == EVENTS
    assert emit.key == src.transfer_id.encode()
    env = emit.envelope
    assert env.type == "fr.relais.event.retry_scheduled"
    assert env.source == "/relais/delivery"
    assert env.content_type == JSON
    assert env.transfer_id == src.transfer_id
    assert (env.producer, env.target, env.attempt) == (src.producer, expected_target, src.attempt)
    assert env.id != src.id
    assert orjson.loads(env.data) == {"kind": "retry_scheduled", "stage": "delivery", "http_status": 503}


def test_event_without_detail_carries_kind_and_stage_only() -> None:
    emit = event(make_envelope(), "accepted", "ingress")
    assert orjson.loads(emit.envelope.data) == {"kind": "accepted", "stage": "ingress"}
    assert Envelope.from_headers(emit.envelope.to_headers(), emit.envelope.data) == emit.envelope


# --- comma-separated attributes -----------------------------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [
    (None, []),
    ("", []),
    (" , ,", []),
    ("a", ["a"]),
    ("a,b", ["a", "b"]),
    (" a , b ,", ["a", "b"]),
    ("b,a,b,a", ["b", "a"]),
    ("a,,c", ["a", "c"]),
])
def test_split_csv(value: str | None, expected: list[str]) -> None:
    assert split_csv(value) == expected


@pytest.mark.parametrize("items", [[], ["a"], ["essms-a", "sidoba", "ars.idf"]])
def test_join_csv_is_the_inverse_of_split_csv(items: list[str]) -> None:
    assert split_csv(join_csv(items)) == items
    assert join_csv(items) == ",".join(items)


def decoded(env: Envelope) -> dict[str, str]:
    return {k: v.decode() for k, v in env.to_headers()}


def test_real_envelopes_are_valid() -> None:
    validator = envelope_validator()
    assert not list(validator.iter_errors(decoded(make_envelope())))
    assert not list(validator.iter_errors(decoded(event(make_envelope(), "delivered", "delivery").envelope)))


def test_broken_envelopes_are_not() -> None:
    validator = envelope_validator()
    headers = decoded(make_envelope())
    for broken in ({k: v for k, v in headers.items() if k != "ce_id"},
                   {**headers, "ce_specversion": "0.3"},
                   {**headers, "ce_type": "something.else"},
                   {**headers, "ce_attempt": "two"},
                   {**headers, "x-unknown": "1"},
                   {**headers, "ce_subject": "Jean DUPONT"}):
        assert list(validator.iter_errors(broken)), broken
