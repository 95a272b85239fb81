"""`relais ledger rebuild|purge` and `relais targets list|pause|resume`: the operator's ledger commands."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from collections.abc import Sequence
from datetime import timedelta

import orjson

from services.core.errors import RelaisError
from services.core.settings import Settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relais", description="Ledger and target commands for operators. "
                                     "They use RELAIS_DATABASE_URL (and Kafka for `ledger rebuild`).")
    sub = parser.add_subparsers(dest="group", required=True)
    ledger = sub.add_parser("ledger", help="the ledger database").add_subparsers(dest="action", required=True)
    ledger.add_parser("rebuild", help="replay transfers.events from the beginning into an EMPTY ledger "
                                      "(RELAIS_DATABASE_URL); refuses a ledger that holds data")
    purge = ledger.add_parser("purge", help="remove finished transfers older than RELAIS_LEDGER_RETENTION_DAYS")
    purge.add_argument("--days", type=float, help="override the retention, in days")
    targets = sub.add_parser("targets", help="targets").add_subparsers(dest="action", required=True)
    targets.add_parser("list", help="every target with its health (JSON lines)")
    pause = targets.add_parser("pause", help="pause a target: its records wait, no attempts")
    pause.add_argument("target")
    pause.add_argument("--reason")
    resume = targets.add_parser("resume", help="resume a paused target")
    resume.add_argument("target")
    return parser


def main(argv: Sequence[str]) -> int:
    """Run one command; exit 0 on success, 2 on errors."""
    args = _parser().parse_args(list(argv))
    try:
        return asyncio.run(_run(args, Settings()))
    except (RelaisError, ValueError) as exc:
        print(f"relais {args.group}: {exc}", file=sys.stderr)
        return 2


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    from services.core.blobstore import prune_local_blobs
    from services.launcher import make_bus
    from services.ops.context import OpsContext
    from services.tracker import audit, opstate, sealed
    from services.tracker.ledger import Ledger
    from services.tracker.rebuild import rebuild
    from services.tracker.retention import purge

    sealed.install(settings)  # ledger values that may quote health data are sealed at rest

    ledger = Ledger(settings.database_url)
    try:
        await ledger.create_schema()
        if args.group == "ledger" and args.action == "rebuild":
            bus = make_bus(settings)
            await bus.start()
            try:
                done = await rebuild(bus, ledger, batch_size=settings.batch_size)
            finally:
                await bus.stop()
            print(f"ledger rebuilt: {done.read} event(s) read, {done.applied} applied, {done.skipped} skipped")
        elif args.group == "ledger":
            days = args.days if args.days is not None else settings.ledger_retention_days
            gone = await purge(ledger, timedelta(days=days))
            audit_days = settings.audit_retention_days
            audit.bind(ledger, settings)
            audited = await audit.purge(ledger, timedelta(days=audit_days))
            blobs = prune_local_blobs(settings)
            print(f"purged {gone.transfers} transfer(s), {gone.deliveries} deliveries, {gone.events} event(s), "
                  f"{gone.access_log} access-log line(s) older than {days:g} day(s); "
                  f"{audited} audit row(s) older than {audit_days:g} day(s); {blobs} blob(s) past retention")
        elif args.action == "list":
            context = OpsContext.build(settings, ledger, make_bus(settings))
            for item in await context.targets_view():
                print(orjson.dumps(item).decode())
        else:
            context = OpsContext.build(settings, ledger, make_bus(settings))
            if context.targets.get(args.target) is None:
                raise ValueError(f"no target {args.target} in RELAIS_TARGETS_FILE")
            state = await opstate.set_paused(ledger, args.target, args.action == "pause",
                                             by=f"cli:{getpass.getuser()}", reason=getattr(args, "reason", None))
            print(orjson.dumps(state.as_dict()).decode())
        return 0
    finally:
        await ledger.close()
