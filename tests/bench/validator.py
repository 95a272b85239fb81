"""Validator benchmark, one core: (a) orjson parse, (b) fhir.resources base validation, (c) the full engine.

`python -m tests.bench.validator [--rounds N]` prints Bundles/s and ms/Bundle (p50/p99) for a
30-entry and a 300-entry TDDUI Bundle. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import orjson

from services.validator.base import check_structure
from services.validator.logic import validate_bundle
from services.validator.ruleset import ruleset
from tests.fixtures.tddui import make_bundle


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def measure(fns: dict[str, Callable[[], object]], rounds: int,
            chunks: int = 10) -> dict[str, tuple[float, float, float]]:
    """(Bundles/s, p50 ms, p99 ms) of each function, `rounds` calls each after a short warm-up.

    The functions take turns in `chunks` slices, so a noisy neighbour (a test run on the other
    core, a CPU frequency change) weighs on all of them alike and their ratio stays honest.
    """
    for fn in fns.values():
        for _ in range(max(3, rounds // 20)):
            fn()
    times: dict[str, list[float]] = {label: [] for label in fns}
    per_chunk = max(1, rounds // chunks)
    for _ in range(chunks):
        for label, fn in fns.items():
            for _ in range(per_chunk):
                started = time.perf_counter()
                fn()
                times[label].append((time.perf_counter() - started) * 1000)
    return {label: (1000 / statistics.fmean(t), _percentile(t, 50), _percentile(t, 99)) for label, t in times.items()}


def run(rounds: int = 300) -> list[str]:
    """The benchmark's report lines."""
    ruleset()  # compile the rules before timing
    lines = []
    for size in (30, 300):
        raw = orjson.dumps(make_bundle(size, seed=1))
        n = rounds if size == 30 else max(20, rounds // 10)
        cases = {
            "(a) orjson parse": lambda raw=raw: orjson.loads(raw),
            "(b) fhir.resources base": lambda raw=raw: check_structure(orjson.loads(raw)),
            "(c) full engine": lambda raw=raw: validate_bundle(raw),
        }
        results = measure(cases, n)
        for label, (rate, p50, p99) in results.items():
            lines.append(f"{size:>3}-entry {label:<24} {rate:8.0f} Bundles/s  p50 {p50:7.2f} ms  p99 {p99:7.2f} ms")
        base, full = results["(b) fhir.resources base"][1], results["(c) full engine"][1]
        lines.append(f"{size:>3}-entry profile rules add {100 * (full - base) / base:.0f}% on top of (b) (p50)")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.validator", description=__doc__)
    parser.add_argument("--rounds", type=int, default=300, help="Bundles per 30-entry measurement")
    args = parser.parse_args()
    print("\n".join(["== Relais validator benchmark (one core) ==", *run(args.rounds)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
