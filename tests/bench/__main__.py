"""`python -m tests.bench` (or `make bench`): benchmarks that print figures, never pass/fail.

Uses RELAIS_KAFKA_BOOTSTRAP when set, else starts a local Kafka from the Maven Central jars.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

from tests.bench import kafka_bootstrap, pipeline


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accept", type=int, default=2000, help="Bundles for the ingress acceptance run")
    parser.add_argument("--e2e", type=int, default=500, help="Bundles for the end-to-end run")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent HTTP clients")
    parser.add_argument("--only", choices=("pipeline", "buses", "delivery", "cores"), default=None,
                        help="run one benchmark (default: pipeline and buses); cores = `relais run` on every "
                             "core, embedded bus, no Kafka (tests/bench/cores.py)")
    parser.add_argument("--validator", action="store_true",
                        help="run only the validator benchmark (one core, no Kafka): tests/bench/validator.py")
    args = parser.parse_args()
    if args.validator:
        from tests.bench import validator

        print("\n".join(validator.run()))
        return 0

    if args.only == "cores":
        from tests.bench import cores

        print("\n".join(["== Relais: every core (issue 16) ==", *cores.run(400, 50, 15)]))
        return 0
    lines: list[str] = []
    with kafka_bootstrap() as bootstrap:
        if args.only in (None, "pipeline"):
            print("bench: pipeline (one process per stage, Kafka) ...", file=sys.stderr)
            with tempfile.TemporaryDirectory(prefix="relais-bench-") as work:
                lines += asyncio.run(pipeline.run(bootstrap, Path(work), accept_count=args.accept,
                                                  e2e_count=args.e2e, concurrency=args.concurrency))
        if args.only in (None, "buses"):
            from tests.bench import buses

            print("bench: embedded bus beside Kafka ...", file=sys.stderr)
            lines += buses.run(bootstrap)
        if args.only == "delivery":
            from tests.bench import delivery

            with tempfile.TemporaryDirectory(prefix="relais-bench-delivery-") as work:
                lines += asyncio.run(delivery.bench(bootstrap, Path(work), 600))
    print("\n".join(["", "== Relais benchmark (2-core machine, one process per stage) ==", *lines]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
