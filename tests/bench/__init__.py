"""Benchmarks: they print figures and never pass or fail (see tests/bench/README.md)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def kafka_bootstrap() -> Iterator[str]:
    """RELAIS_KAFKA_BOOTSTRAP when set, else a local Kafka from the Maven jars for the benchmark's duration."""
    bootstrap = os.environ.get("RELAIS_KAFKA_BOOTSTRAP")
    if bootstrap:
        yield bootstrap
        return
    from devtools.devkafka import LocalKafka

    print("bench: starting a local Kafka ...", file=sys.stderr)
    with LocalKafka() as kafka:
        yield kafka.bootstrap
