"""`relais dlq list|show|replay|discard`: the operator's dead-letter commands, a client of the broker's `/ops` API.

They work from any folder and on either bus: nothing here opens the ledger or the log.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import orjson

from services.ops.client import (
    EXIT_CODES_HELP,
    EXIT_CONFLICT,
    EXIT_NOT_FOUND,
    EXIT_OK,
    OpsClient,
    OpsError,
    add_connection_arguments,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relais dlq", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXIT_CODES_HELP,
        description="Dead letters of every stage (deliveries a target refused or that ran out of attempts, and "
                    "records a stage could not handle): list, show, replay to where they failed, discard. A client "
                    "of the running broker's /ops API (writes need an operator token with role 'operator').")
    sub = parser.add_subparsers(dest="action", required=True)

    def filters(p: argparse.ArgumentParser) -> None:
        p.add_argument("--target")
        p.add_argument("--stage", help="stage that gave up: validator, router, delivery")
        p.add_argument("--producer")
        p.add_argument("--reason", help="substring of the failure reason")
        p.add_argument("--since", help="ISO 8601 time")
        p.add_argument("--until", help="ISO 8601 time")

    listing = sub.add_parser("list", help="list open dead letters")
    filters(listing)
    listing.add_argument("--closed", action="store_true", help="include discarded ones")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    show = sub.add_parser("show", help="one dead letter: reason, stage, attempts, original topic/partition/offset")
    show.add_argument("id", help="TRANSFER_ID/TARGET, or TRANSFER_ID/@STAGE for a stage's dead letter")
    show.add_argument("--payload", action="store_true", help="also print the Bundle (health data: access logged)")
    replay = sub.add_parser("replay", help="replay one dead letter, or all matching filters, to where it failed")
    replay.add_argument("id", nargs="?", help="TRANSFER_ID/SLOT; omit to use filters")
    filters(replay)
    replay.add_argument("--note")
    discard = sub.add_parser("discard", help="discard one dead letter, saying why")
    discard.add_argument("id", help="TRANSFER_ID/SLOT")
    discard.add_argument("--reason", required=True)
    for p in (listing, show, replay, discard):
        add_connection_arguments(p)
    return parser


def main(argv: Sequence[str]) -> int:
    """Run one dead-letter command; exit codes as EXIT_CODES_HELP says."""
    args = _parser().parse_args(list(argv))
    try:
        return _run(args, OpsClient.from_args(args))
    except OpsError as exc:
        print(f"relais dlq {args.action}: {exc}", file=sys.stderr)
        return exc.exit_code


def _path(dlq_id: str) -> str:
    transfer_id, sep, slot = dlq_id.partition("/")
    if not (transfer_id and sep and slot):
        raise OpsError(f"{dlq_id!r} is not a dead-letter id: use TRANSFER_ID/TARGET or TRANSFER_ID/@STAGE "
                       "(as `relais dlq list` prints)", 2)
    return f"/ops/dead-letters/{quote(transfer_id, safe='')}/{quote(slot, safe='')}"


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in ("target", "stage", "producer", "reason", "since", "until")}


def _run(args: argparse.Namespace, client: OpsClient) -> int:
    if args.action == "list":
        items = client.call("GET", "/ops/dead-letters", params={**_filters(args), "closed": args.closed})["items"]
        if args.json:
            for item in items:
                print(orjson.dumps(item).decode())
        else:
            _print_table(items)
        return EXIT_OK
    if args.action == "replay" and not args.id:
        flt = {k: v for k, v in _filters(args).items() if v}
        if not flt:
            raise OpsError("give an id or at least one filter (--target, --stage, --producer, --reason, --since, "
                           "--until)", 2)
        answer = client.call("POST", "/ops/dead-letters/replay", body={**flt, "note": args.note})
        done, skipped = answer["replayed"], answer.get("skipped") or []
        for i in done:
            print(f"{i} replayed")
        for s in skipped:
            print(f"relais dlq replay: {s['id']} not replayed: {s['reason']}", file=sys.stderr)
        if not done and not skipped:
            print("nothing matched", file=sys.stderr)
            return EXIT_NOT_FOUND
        return EXIT_CONFLICT if skipped else EXIT_OK
    path = _path(args.id)
    if args.action == "show":
        body = client.call("GET", path)
        if args.payload:
            transfer_id, _, slot = args.id.partition("/")
            bundle = client.call("GET", f"/ops/transfers/{quote(transfer_id, safe='')}/bundle",
                                 params={"target": slot}, raw=True)
            body["bundle"] = orjson.loads(bundle)
        print(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode())
    elif args.action == "replay":
        client.call("POST", f"{path}/replay")
        print(f"{args.id} replayed")
    else:
        client.call("POST", f"{path}/discard", body={"reason": args.reason})
        print(f"{args.id} discarded")
    return EXIT_OK


def _print_table(items: list[dict[str, Any]]) -> None:
    if not items:
        print("no dead letters", file=sys.stderr)
        return
    print(f"{'ID':<48} {'STAGE':<10} {'ATTEMPTS':>8}  {'SINCE':<19}  REASON")
    for d in items:
        reason = " ".join(str(d.get("reason") or "").split())[:100]
        print(f"{d['id']:<48} {d['stage']:<10} {d.get('attempts') or 0:>8}  "
              f"{str(d['dead_lettered_at'])[:19].replace('T', ' '):<19}  {reason}")
