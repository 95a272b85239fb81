"""`relais targets|ledger|status`: operator commands.

`targets list|pause|resume`, `ledger transfers|show` and `status` are clients of the running broker's
`/ops` API (services.ops.client): any folder, either bus. `ledger rebuild|purge` open the ledger
database directly (RELAIS_DATABASE_URL), because maintaining that database is their point. `relais status`
shows a person's view of one transfer's timeline (`render_status`, pure) and exits with the code its
state gives.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from datetime import timedelta
from typing import Any
from urllib.parse import quote

import orjson

from services.core.errors import RelaisError
from services.core.outcome import issues_of
from services.ops.client import EXIT_CODES_HELP, EXIT_OK, OpsClient, OpsError, add_connection_arguments
from services.tracker import logic

STATUS_EXIT = {logic.DELIVERED: 0, logic.REJECTED: 11, logic.DEAD_LETTERED: 12}
STATUS_EXIT_IN_FLIGHT = 10
STATUS_EXIT_HELP = """\
exit code of `relais status` (the transfer's state):
  0  delivered to every target     10  still in flight (accepted, validated, routed, delivering)
  11 rejected (invalid Bundle)     12 dead-lettered (an operator must replay or discard it)
"""


def status_exit_code(status: str) -> int:
    """0 delivered, 11 rejected, 12 dead-lettered, 10 anything still in flight."""
    return STATUS_EXIT.get(status, STATUS_EXIT_IN_FLIGHT)


def _issues(outcome: Any) -> list[str]:
    """One line an error or warning of an OperationOutcome: severity, FHIRPath, diagnostics, [rule]."""
    return [f"{i['severity']:<8} {', '.join(i['expression']) or '(no FHIRPath)'}  {i['diagnostics']}"
            + (f"  [{i['rule']}]" if i["rule"] else "") for i in issues_of(outcome)]


def render_status(tl: dict[str, Any]) -> str:
    """The transfer's state, then per target: status, attempts, ids assigned, errors and warnings (FHIRPath)."""
    out = [f"transfer {tl['id']}: {tl['status']}",
           f"  producer {tl.get('producer') or '-'}, created {str(tl['created_at'])[:19].replace('T', ' ')} UTC, "
           f"last change after {tl.get('duration_ms', 0) / 1000:.1f} s"]
    steps = tl.get("steps") or []
    for step in steps:
        detail = step.get("detail") or {}
        if step["kind"] in ("rejected", "validated") and detail.get("outcome"):
            found = _issues(detail["outcome"])
            if found:
                out.append(f"  validation ({step['kind']}):")
                out += [f"    {line}" for line in found]
        if step["kind"] == "failed":
            out.append(f"  stage {step['stage']} could not handle it: {detail.get('reason', '')} "
                       "(a dead letter: relais dlq list)")
    for d in tl.get("deliveries") or []:
        http = f", last HTTP {d['last_http_status']}" if d.get("last_http_status") else ""
        out.append(f"  target {d['target']}: {d['status']}, {d['attempts']} attempt(s){http}")
        for full_url, location in (d.get("assigned") or {}).items():
            out.append(f"    id assigned: {full_url} -> {location}")
        last = next((s for s in reversed(steps) if s.get("target") == d["target"]
                     and (s.get("detail") or {}).get("reason")), None)
        if last is not None and d["status"] not in (logic.DELIVERED,):
            out.append(f"    last reason: {last['detail']['reason']}")
        out += [f"    {line}" for line in _issues(d.get("outcome"))]
    return "\n".join(out)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relais", formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Operator commands: targets, ledger, status.",
                                     epilog=EXIT_CODES_HELP)
    sub = parser.add_subparsers(dest="group", required=True)
    ledger = sub.add_parser(
        "ledger", help="the ledger: queries through /ops; rebuild and purge on the database itself",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXIT_CODES_HELP,
        description="`transfers` and `show` ask the running broker (/ops). `rebuild` and `purge` open the "
                    "ledger database directly (RELAIS_DATABASE_URL; `rebuild` also reads transfers.events from "
                    "the bus): run them where that database is, with the broker's configuration.",
    ).add_subparsers(dest="action", required=True)
    ledger.add_parser("rebuild", help="DIRECT DATABASE ACCESS: replay transfers.events from the beginning into an "
                                      "EMPTY ledger (RELAIS_DATABASE_URL); refuses a ledger that holds data")
    purge = ledger.add_parser("purge", help="DIRECT DATABASE ACCESS: remove finished transfers older than "
                                            "RELAIS_LEDGER_RETENTION_DAYS")
    purge.add_argument("--days", type=float, help="override the retention, in days")
    transfers = ledger.add_parser("transfers", help="transfers, newest first (through /ops; JSON lines)")
    for name in ("status", "producer", "target", "finess", "since", "until"):
        transfers.add_argument(f"--{name}")
    transfers.add_argument("--limit", type=int, default=50)
    show = ledger.add_parser("show", help="one transfer's timeline (through /ops; JSON)")
    show.add_argument("transfer_id")
    show.add_argument("--full", action="store_true", help="include the targets' answers (access logged)")
    targets = sub.add_parser("targets", help="targets: list with health, pause, resume (through /ops)",
                             formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXIT_CODES_HELP,
                             ).add_subparsers(dest="action", required=True)
    listing = targets.add_parser("list", help="every target with its health (JSON lines)")
    pause = targets.add_parser("pause", help="pause a target: its records wait, no attempts")
    pause.add_argument("target")
    pause.add_argument("--reason")
    resume = targets.add_parser("resume", help="resume a paused target")
    resume.add_argument("target")
    status = sub.add_parser(
        "status", help="a transfer's state, per target (through /ops)",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=STATUS_EXIT_HELP + EXIT_CODES_HELP,
        description="A transfer's state and, per target, its status, attempts, the ids the target assigned and "
                    "every error and warning with its FHIRPath. Reads /ops/transfers/ID?full=true (access logged).")
    status.add_argument("transfer_id")
    status.add_argument("--json", action="store_true", help="the /ops timeline as JSON, for scripts")
    for p in (transfers, show, listing, pause, resume, status):
        add_connection_arguments(p)
    return parser


def main(argv: Sequence[str]) -> int:
    """Run one command; exit codes as EXIT_CODES_HELP (and STATUS_EXIT_HELP) say."""
    args = _parser().parse_args(list(argv))
    name = f"relais {args.group}" + (f" {args.action}" if getattr(args, "action", None) else "")
    try:
        if args.group == "ledger" and args.action in ("rebuild", "purge"):
            return asyncio.run(_direct(args))
        return _remote(args, OpsClient.from_args(args))
    except OpsError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return exc.exit_code
    except (RelaisError, ValueError, OSError) as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2


def _remote(args: argparse.Namespace, client: OpsClient) -> int:
    if args.group == "status":
        timeline = client.call("GET", f"/ops/transfers/{quote(args.transfer_id, safe='')}", params={"full": True})
        print(orjson.dumps(timeline, option=orjson.OPT_INDENT_2).decode() if args.json else render_status(timeline))
        return status_exit_code(timeline["status"])
    if args.group == "ledger" and args.action == "transfers":
        params = {k: getattr(args, k) for k in ("status", "producer", "target", "finess", "since", "until", "limit")}
        for item in client.call("GET", "/ops/transfers", params=params)["items"]:
            print(orjson.dumps(item).decode())
    elif args.group == "ledger":
        found = client.call("GET", f"/ops/transfers/{quote(args.transfer_id, safe='')}", params={"full": args.full})
        print(orjson.dumps(found, option=orjson.OPT_INDENT_2).decode())
    elif args.action == "list":
        for item in client.call("GET", "/ops/targets")["items"]:
            print(orjson.dumps(item).decode())
    elif args.action == "pause":
        state = client.call("POST", f"/ops/targets/{quote(args.target, safe='')}/pause", body={"reason": args.reason})
        print(orjson.dumps(state).decode())
    else:
        state = client.call("POST", f"/ops/targets/{quote(args.target, safe='')}/resume")
        print(orjson.dumps(state).decode())
    return EXIT_OK


async def _direct(args: argparse.Namespace) -> int:
    """`ledger rebuild|purge`: the ledger database itself, with this shell's RELAIS_* configuration."""
    # Imported here, not above: the database and bus stacks load only for these two direct commands, so the
    # operator commands that merely talk to /ops (dlq, targets, status) start at once.
    from services.core.blobstore import prune_local_blobs
    from services.core.buses import make_bus
    from services.core.settings import Settings
    from services.tracker import audit, sealed
    from services.tracker.ledger import Ledger
    from services.tracker.maintenance import purge, rebuild

    settings = Settings()
    sealed.install(settings)  # ledger values that may quote health data are sealed at rest
    ledger = Ledger(settings.database_url)
    try:
        await ledger.create_schema()
        if args.action == "rebuild":
            bus = make_bus(settings)
            await bus.start()
            try:
                done = await rebuild(bus, ledger, batch_size=settings.batch_size)
            finally:
                await bus.stop()
            print(f"ledger rebuilt: {done.read} event(s) read, {done.applied} applied, {done.skipped} skipped")
        else:
            days = args.days if args.days is not None else settings.ledger_retention_days
            gone = await purge(ledger, timedelta(days=days))
            audit_days = settings.audit_retention_days
            audit.bind(ledger, settings)
            audited = await audit.purge(ledger, timedelta(days=audit_days))
            blobs = prune_local_blobs(settings)
            print(f"purged {gone.transfers} transfer(s), {gone.deliveries} deliveries, {gone.events} event(s), "
                  f"{gone.access_log} access-log line(s) older than {days:g} day(s); "
                  f"{audited} audit row(s) older than {audit_days:g} day(s); {blobs} blob(s) past retention")
        return EXIT_OK
    finally:
        await ledger.close()
