"""The `relais` command: run the broker (whole or one stage), a local Kafka, a demo target, and tools.

Each sub-command imports what it needs when it runs (the imports inside functions below): `relais status`
must not load the HTTP, database and Kafka stacks, and the development tools (`devtools`, installed from the
repository only) must not be needed by an installed product.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from services import __version__
from services.core.errors import ConfigurationError
from services.core.logging import configure_logging
from services.core.settings import Settings

DESCRIPTION = """\
Relais — asynchronous transfer broker for TDDUI (Transfert de données DUI) FHIR exports.

Configuration comes from RELAIS_* environment variables (see README, 'Configuration').
"""

EPILOG = """\
examples:
  relais run --demo-target          the whole broker (one process per core, embedded log) and a demo target
  relais validator                  one stage, to scale it out as its own process
  relais dev-kafka                  a local single-node Kafka; prints RELAIS_KAFKA_BOOTSTRAP=...
  relais dlq list                   dead letters of the running broker (operator commands talk to its /ops
                                    API: --url or RELAIS_URL, token in RELAIS_OPS_TOKEN or --token-file)

operator commands (dlq, targets, ledger transfers|show, status) exit with:
  0 done, 1 not found, 2 usage error, 3 broker unreachable, 4 refused (token or role), 5 conflict;
  `relais status` exits 0 delivered, 10 in flight, 11 rejected, 12 dead-lettered.
"""

STAGE_HELP = {
    "ingress": "HTTP ingress: POST /fhir, GET /fhir/_transfer/{id}, /metadata, /healthz, /readyz, /metrics",
    "validator": "validator worker: transfers.received -> transfers.validated | transfers.rejected",
    "router": "router worker: transfers.validated -> deliveries (one record per target)",
    "delivery": "delivery worker: deliveries (+ retry tiers) -> target FHIR base | deliveries.dlq",
    "tracker": "tracker worker: transfers.events -> ledger database",
    "alerts": "alerts loop: DLQ growth, lag per stage, waiting records per target -> log and webhook",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with a sub-command per task."""
    parser = argparse.ArgumentParser(prog="relais", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"relais {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="run the whole broker on this machine (one process per core, supervised)",
                         description="Run the stages as several processes under one supervisor: the ingress, and "
                                     "one worker process per core running every worker stage (children that die "
                                     "are restarted; SIGTERM drains them all). With RELAIS_KAFKA_BOOTSTRAP they use "
                                     "that Kafka; without it, the embedded SQLite log (nothing else to install). "
                                     "Exit code: 0 stopped cleanly, 2 invalid configuration, 10 + N child N failed "
                                     "(10 ingress, 11.. workers, then the demo target).")
    run.add_argument("--workers", type=int, default=None, metavar="N",
                     help="worker processes (default: RELAIS_WORKERS, whose 0 means one per core)")
    run.add_argument("--in-process", action="store_true",
                     help="run the stages in this one process, without a supervisor (what each child runs)")
    run.add_argument("--local-kafka", action="store_true",
                     help="without RELAIS_KAFKA_BOOTSTRAP, start a local Kafka from Maven Central jars "
                          "(needs Java 17 and Maven) instead of using the embedded log")
    run.add_argument("--stages", default=",".join(_all_stages()),
                     help="comma-separated stages to run (default: all: %(default)s)")
    run.add_argument("--demo-target", action="store_true",
                     help="also serve a demo FHIR target on 127.0.0.1:8090 (target id 'demo')")
    run.add_argument("--demo-target-port", type=int, default=8090, help="port of the demo target")

    for stage, text in STAGE_HELP.items():
        sub.add_parser(stage, help=text, description=f"Run the {text}. Start several to scale out: on Kafka "
                       "(RELAIS_KAFKA_BOOTSTRAP) or on the embedded log of this machine, their group shares the "
                       "partitions.")

    sub.add_parser("dev-kafka", help="start a local single-node Kafka (prints RELAIS_KAFKA_BOOTSTRAP=...)",
                   add_help=False)
    sub.add_parser("demo-target", help="serve a demo FHIR transaction receiver", add_help=False)
    sub.add_parser("dlq", help="dead letters of every stage: list, show, replay, discard (through /ops)",
                   add_help=False)
    sub.add_parser("ledger", help="ledger: transfers, show (through /ops); rebuild, purge (direct database access)",
                   add_help=False)
    sub.add_parser("targets", help="targets: list with health, pause, resume (through /ops)", add_help=False)
    sub.add_parser("keys", help="encryption keys: rotate (re-encrypt live data), status, new, new-audit-key",
                   add_help=False)
    validate = sub.add_parser("validate", help="validate TDDUI Bundle files offline",
                              description="Validate Bundle JSON files (or directories of them). Exit 0 when "
                                          "all are valid, 1 when any has an error, 2 on usage errors.")
    validate.add_argument("paths", nargs="+", help="files or directories (*.json)")
    validate.add_argument("--format", choices=("text", "json"), default="text",
                          help="text: readable report; json: one JSON object per line per file")
    validate.add_argument("--warnings-as-errors", action="store_true",
                          help="treat every warning as an error (the file is then invalid)")
    validate.add_argument("--ignore-rule", action="append", default=[], metavar="RULE",
                          help="ignore this rule id (repeatable; a trailing '/' ignores every rule under it)")
    validate.add_argument("--lang", choices=("en", "fr"), default="en", help="language of the diagnostics")
    send = sub.add_parser(
        "send", help="post Bundle files to a Relais ingress (bulk, resumable, idempotent)",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_send_exit_codes(),
        description="Post one Bundle or whole directories of them to a Relais ingress, with bounded "
                    "concurrency, a progress bar and a final report (one line per file). Each request carries an "
                    "Idempotency-Key made of the ingress URL, the targets and the file's content, so a resend "
                    "after a crash creates nothing twice; the journal makes re-runs skip requests already "
                    "accepted with the same key. --wait follows each transfer to delivered, rejected or "
                    "dead-lettered.")
    send.add_argument("paths", nargs="+", help="Bundle files or directories (*.json)")
    send.add_argument("--to", required=True, metavar="TARGET", help="target id(s) for X-Relais-Target")
    send.add_argument("--url", default="http://127.0.0.1:8080", help="Relais base URL (default: %(default)s)")
    send.add_argument("--token", default=None, help="producer token (default: $RELAIS_TOKEN)")
    send.add_argument("--concurrency", type=int, default=8, help="requests in flight (default: %(default)s)")
    send.add_argument("--journal", default=None,
                      help="journal file of accepted files (default: .relais-send.journal)")
    send.add_argument("--report", default=None, help="also write the report as JSON to this file")
    send.add_argument("--wait", action="store_true",
                      help="poll each transfer to its final state and report delivered / rejected / dead-lettered")
    send.add_argument("--wait-timeout", type=float, default=900.0, metavar="SECONDS",
                      help="with --wait, stop waiting after this long; unfinished transfers are 'pending' "
                           "(default: %(default)s)")

    sub.add_parser("status", help="a transfer's state per target, through /ops (relais status --help)",
                   add_help=False)
    return parser


def _send_exit_codes() -> str:
    from services.send import EXIT_CODES

    return EXIT_CODES


def _all_stages() -> Sequence[str]:
    from services.launcher import ALL_STAGES

    return ALL_STAGES


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `relais` console script."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    # These two own their whole command line (and their --help).
    if args_list and args_list[0] in ("dev-kafka", "demo-target") and not has_devtools():
        return _no_devtools(args_list[0])
    if args_list and args_list[0] == "dev-kafka":
        from devtools.devkafka import main as dev_kafka

        return dev_kafka(args_list[1:])
    if args_list and args_list[0] == "demo-target":
        from devtools.demotarget.__main__ import main as demo_target

        return demo_target(args_list[1:])
    if args_list and args_list[0] == "dlq":
        from services.ops.dlq_cli import main as dlq

        return dlq(args_list[1:])
    if args_list and args_list[0] == "keys":
        from services.keyrotation import main as keys

        return keys(args_list[1:])
    if args_list and args_list[0] in ("ledger", "targets", "status"):
        from services.ops.cli import main as ops_cli

        return ops_cli(args_list)

    args = build_parser().parse_args(args_list)
    if args.command == "send":
        from services.send import main as send_main

        if args.concurrency < 1:
            print("relais send: --concurrency must be at least 1", file=sys.stderr)
            return 2
        return send_main(args.paths, url=args.url, target=args.to, token=args.token or os.environ.get("RELAIS_TOKEN"),
                         concurrency=args.concurrency, journal_path=args.journal, report_path=args.report,
                         wait=args.wait, wait_timeout_s=args.wait_timeout)
    if args.command == "validate":
        from services.validator.options import ValidationOptions
        from services.validator.report import main as validate

        options = ValidationOptions.of(args.warnings_as_errors, args.ignore_rule, args.lang)
        try:
            return validate(args.paths, args.format, options=options)
        except BrokenPipeError:  # `relais validate ... | head` closed the pipe: not an error of ours
            sys.stderr.close()
            return 0
    return _run_stages(args)


def has_devtools() -> bool:
    """True when the development tools (`devtools`: local Kafka, demo target) are installed beside Relais."""
    return importlib.util.find_spec("devtools") is not None


def _no_devtools(what: str) -> int:
    print(f"relais: {what} is a development tool, not part of the Relais package; install Relais from its "
          "repository to use it (make install, or: pip install -e . -e ./devtools)", file=sys.stderr)
    return 2


def _run_stages(args: argparse.Namespace) -> int:
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"relais: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    names = _stage_names(args)
    try:
        if args.command == "run":
            return _run_all(names, settings, args)
        from services.launcher import run

        return run(names, settings)
    except ConfigurationError as exc:
        print(f"relais: {exc}", file=sys.stderr)
        return 2


def _stage_names(args: argparse.Namespace) -> list[str]:
    if args.command != "run":
        return [args.command]
    names = [n.strip() for n in args.stages.split(",") if n.strip()]
    unknown = [n for n in names if n not in _all_stages()]
    if unknown:
        raise SystemExit(f"relais run: unknown stage(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(_all_stages())}")
    return names


def _run_all(names: list[str], settings: Settings, args: argparse.Namespace) -> int:
    if args.demo_target and not has_devtools():
        return _no_devtools("--demo-target")
    if args.local_kafka and not settings.kafka_bootstrap and not has_devtools():
        return _no_devtools("--local-kafka")
    if args.in_process:
        from services.launcher import run

        extra = []
        if args.demo_target:
            from devtools.demotarget.app import create_app as demo_app

            extra.append((demo_app(), "127.0.0.1", args.demo_target_port))
        return run(names, settings, extra_servers=extra)
    if settings.kafka_bootstrap or not args.local_kafka:
        where = settings.kafka_bootstrap or f"the embedded log {settings.embedded_log_path}"
        print(f"relais: bus = {where}", file=sys.stderr)
        _print_banner(settings, args)
        return _supervise(names, settings, args)

    from devtools.devkafka.local import LocalKafka

    print("relais: starting a local Kafka (the first run downloads its jars) ...", file=sys.stderr)
    with LocalKafka() as kafka:
        os.environ["RELAIS_KAFKA_BOOTSTRAP"] = kafka.bootstrap  # the children read their settings from it
        settings = settings.model_copy(update={"kafka_bootstrap": kafka.bootstrap})
        print(f"relais: bus = local Kafka at {kafka.bootstrap}", file=sys.stderr)
        _print_banner(settings, args)
        return _supervise(names, settings, args)


def _supervise(names: list[str], settings: Settings, args: argparse.Namespace) -> int:
    from services.supervisor import Supervisor, plan, worker_count

    workers = worker_count(args.workers if args.workers is not None else settings.workers, os.cpu_count())
    children = plan(names, workers, instance_id=settings.instance_id or socket.gethostname(),
                    demo_target_port=args.demo_target_port if args.demo_target else None,
                    metrics_port=settings.metrics_port)
    print(f"relais: {len(children)} processes: {', '.join(c.name for c in children)}", file=sys.stderr)
    return Supervisor(children, grace_s=settings.shutdown_grace_s + 10).run()


def _print_banner(settings: Settings, args: argparse.Namespace) -> None:
    base = f"http://{settings.http_host}:{settings.http_port}"
    lines = [f"relais: ingress on {base}/fhir  (status: {base}/fhir/_transfer/<id>, metrics: {base}/metrics)"]
    if args.demo_target:
        lines.append(f"relais: demo target on http://127.0.0.1:{args.demo_target_port}/fhir (target id 'demo')")
    lines.append("relais: send a Bundle with:  curl -i -X POST " + base + "/fhir -H 'Content-Type: "
                 "application/fhir+json' -H 'X-Relais-Target: demo' -H 'Authorization: Bearer demo-token' "
                 "--data-binary @examples/bundle-ssiad.json")
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
