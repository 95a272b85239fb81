"""How the attempt journal writes (issue 16): each step of a delivery is one transaction of the ledger's writer.

Through aiosqlite every statement was a thread hop of its own (~200 µs of CPU) and Core compiled it again: the
journal was the largest part of the delivery stage's CPU. Its transactions now run through `Ledger.write` (on a
SQLite file: the writer's synchronous engine, in BEGIN IMMEDIATE), with nothing more than the statements each
step needs.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from services.delivery.journal import DELIVERED, NOT_APPLIED, AttemptJournal, AttemptKey, ClaimVerdict
from services.tracker.ledger import Ledger

OK = {"resourceType": "Bundle", "type": "transaction-response",
      "entry": [{"response": {"status": "201 Created", "location": "Patient/9/_history/1"}}]}


def statements_of(engine: sa.Engine) -> list[str]:
    """The statements `engine` runs from now on (their first word), with a "COMMIT" where a transaction ends."""
    seen: list[str] = []

    def statement(conn: Any, cursor: Any, sql: str, *_: Any) -> None:
        seen.append(sql.split()[0].upper())

    sa.event.listen(engine, "before_cursor_execute", statement)
    sa.event.listen(engine, "commit", lambda conn: seen.append("COMMIT"))
    return seen


async def test_a_delivery_journals_its_claim_answer_and_close_in_three_transactions_of_the_ledgers_writer(
        ledger: Ledger) -> None:
    on_writer = statements_of(ledger.write_engine)
    elsewhere = statements_of(ledger.engine.sync_engine)
    journal = AttemptJournal(ledger, "this")
    key = AttemptKey("tr-1", "demo", 0, 1)

    assert (await journal.claim(key, in_flight_s=60)).verdict is ClaimVerdict.GO
    await journal.finish(key, DELIVERED, 200, OK, {"urn:uuid:1": "Patient/9"})
    await journal.close([key])

    assert on_writer == ["BEGIN", "SELECT", "INSERT", "SELECT", "COMMIT",  # claim: read, start, judge again
                         "BEGIN", "UPDATE", "COMMIT",                      # the answer
                         "BEGIN", "UPDATE", "COMMIT"]                      # the close
    assert elsewhere == []
    prior = await journal.prior(key)  # what was written reads back as written
    assert prior is not None and (prior.state, prior.http_status, prior.response, prior.assigned) == (
        DELIVERED, 200, OK, {"urn:uuid:1": "Patient/9"})


async def test_a_failed_attempt_made_again_restarts_its_row_in_one_transaction(ledger: Ledger) -> None:
    journal = AttemptJournal(ledger, "this")
    key = AttemptKey("tr-2", "demo", 0, 1)
    await journal.claim(key, in_flight_s=60)
    await journal.finish(key, NOT_APPLIED, 503)
    on_writer = statements_of(ledger.write_engine)

    claim = await journal.claim(key, in_flight_s=60)

    assert claim.verdict is ClaimVerdict.GO and claim.prior is not None and claim.prior.state == NOT_APPLIED
    assert on_writer == ["BEGIN", "SELECT", "UPDATE", "SELECT", "COMMIT"]
    prior = await journal.prior(key)
    assert prior is not None and (prior.state, prior.http_status, prior.response) == ("started", None, None)
