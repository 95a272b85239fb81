"""The delivery bench's publisher process reads back exactly the records the bench wrote for it."""

from __future__ import annotations

from pathlib import Path

from services.core.envelope import Emit, Envelope
from tests.bench.publisher import read_records, write_records


def test_records_written_for_the_publisher_read_back_the_same(tmp_path: Path) -> None:
    emits = [Emit("deliveries", b"fast|p1", Envelope(type="fr.relais.delivery.requested", source="/relais/bench",
                                                      transfer_id="t1", data=b'{"resourceType":"Bundle"}\n\x00\xff',
                                                      producer="bench", target="fast", extra={"subject": "p1"})),
             Emit("deliveries", None, Envelope(type="t", source="/s", transfer_id="t2", data=b""))]
    write_records(tmp_path / "records.jsonl", emits)
    assert read_records(tmp_path / "records.jsonl") == emits
