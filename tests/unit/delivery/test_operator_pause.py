"""A target an operator paused (ops API → ledger) gets no attempts: its records wait in a retry tier."""

from __future__ import annotations

from pathlib import Path

import orjson

from services.core.blobstore import LocalBlobStore
from services.core.envelope import Envelope, Record
from services.core.settings import Settings
from services.core.targets import Target, TargetDirectory
from services.core.topics import DELIVERIES
from services.delivery.journal import AttemptJournal
from services.delivery.stage import DeliveryStage
from services.tracker.ledger import Ledger
from services.tracker.opstate import paused_targets, set_paused
from tests.fixtures.tddui import make_bundle
from tests.support.scripted_target import Answer, ScriptedTarget, Seen


async def test_operator_pause_holds_records_and_resume_lets_them_go(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite+aiosqlite:///{tmp_path}/l.db")
    await ledger.create_schema()
    calls: list[Seen] = []

    def answer(request: Seen) -> Answer:
        if request.method == "POST":  # transactions; GET /metadata is the capability read (conditional create)
            calls.append(request)
        return Answer(200, json={"resourceType": "Bundle", "type": "transaction-response", "entry": []})

    async with ScriptedTarget(answer) as server:
        target = Target(id="t", base_url=server.base_url)
        stage = DeliveryStage(Settings(auth_disabled=True, retry_delays_s=[1, 2]), TargetDirectory(targets=[target]),
                              LocalBlobStore(tmp_path / "blobs"), AttemptJournal(ledger))
        env = Envelope(type="fr.relais.delivery", source="/relais/router", transfer_id="tr-1",
                       data=orjson.dumps(make_bundle(2, seed=1)), producer="p", target="t")
        record = Record(DELIVERIES, 0, 0, b"t|x", env)
        try:
            await set_paused(ledger, "t", True, by="alice", reason="maintenance")
            stage.paused_by_operator = await paused_targets(ledger)  # what watch_pauses does every few seconds
            held = await stage.handle(record)
            assert not calls
            assert [e.topic.startswith("deliveries.retry.") for e in held] == [True]
            assert held[0].envelope.attempt == 0  # waiting burns no attempt

            await set_paused(ledger, "t", False, by="alice")
            stage.paused_by_operator = await paused_targets(ledger)
            sent = await stage.handle(record)
            assert len(calls) == 1
            assert any(e.envelope.type == "fr.relais.event.delivered" for e in sent)
        finally:
            await stage.aclose()
            await ledger.close()
