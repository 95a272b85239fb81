"""`relais dlq list|show|replay|discard`: the operator's dead-letter commands (same logic as /ops/dead-letters)."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from collections.abc import Sequence

import orjson

from services.core.blobstore import make_blob_store
from services.core.errors import RelaisError
from services.core.settings import Settings
from services.dlq.logic import DlqFilter
from services.dlq.store import DlqService, parse_time


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relais dlq", description="Inspect and act on dead-lettered "
                                     "deliveries. Reads the ledger (RELAIS_DATABASE_URL), publishes to Kafka.")
    sub = parser.add_subparsers(dest="action", required=True)

    def filters(p: argparse.ArgumentParser) -> None:
        p.add_argument("--target")
        p.add_argument("--producer")
        p.add_argument("--reason", help="substring of the failure reason")
        p.add_argument("--since", help="ISO 8601 time")
        p.add_argument("--until", help="ISO 8601 time")

    listing = sub.add_parser("list", help="list open dead letters (JSON lines)")
    filters(listing)
    listing.add_argument("--closed", action="store_true", help="include discarded ones")
    show = sub.add_parser("show", help="one dead letter's metadata")
    show.add_argument("id", help="TRANSFER_ID/TARGET")
    show.add_argument("--payload", action="store_true", help="also print the Bundle (health data!)")
    replay = sub.add_parser("replay", help="replay one dead letter, or all matching filters")
    replay.add_argument("id", nargs="?", help="TRANSFER_ID/TARGET; omit to use filters")
    filters(replay)
    replay.add_argument("--note")
    discard = sub.add_parser("discard", help="discard one dead letter")
    discard.add_argument("id", help="TRANSFER_ID/TARGET")
    discard.add_argument("--reason", required=True)
    return parser


def main(argv: Sequence[str]) -> int:
    """Run one dead-letter command; exit 0 on success, 1 when nothing matched, 2 on errors."""
    args = _parser().parse_args(list(argv))
    try:
        return asyncio.run(_run(args, Settings()))
    except (RelaisError, ValueError) as exc:
        print(f"relais dlq: {exc}", file=sys.stderr)
        return 2


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    from services.launcher import make_bus
    from services.tracker.ledger import Ledger

    ledger, bus = Ledger(settings.database_url), make_bus(settings)
    service = DlqService(ledger, bus, make_blob_store(settings))
    operator = f"cli:{getpass.getuser()}"
    try:
        if args.action in ("replay", "discard"):
            await bus.start()
        if args.action == "list":
            flt = DlqFilter(args.target, args.producer, args.reason, parse_time(args.since), parse_time(args.until))
            for item in await service.list(flt, include_closed=args.closed):
                print(orjson.dumps(item.summary()).decode())
            return 0
        if args.action == "replay" and not args.id:
            flt = DlqFilter(args.target, args.producer, args.reason, parse_time(args.since), parse_time(args.until))
            if flt == DlqFilter():
                raise ValueError("give an id or at least one filter")
            ids = await service.replay_all(flt, operator, args.note)
            print("\n".join(ids) or "nothing matched", file=sys.stderr if not ids else sys.stdout)
            return 0 if ids else 1
        dl = await service.get(args.id)
        if dl is None:
            print(f"relais dlq: no dead letter {args.id}", file=sys.stderr)
            return 1
        if args.action == "show":
            body = dl.summary()
            if args.payload:
                body["bundle"] = orjson.loads(await service.payload(dl))
            print(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode())
        elif args.action == "replay":
            await service.replay(dl, operator, args.note)
            print(f"{dl.id} replayed")
        else:
            await service.discard(dl, operator, args.reason)
            print(f"{dl.id} discarded")
        return 0
    finally:
        await bus.stop()
        await ledger.close()
