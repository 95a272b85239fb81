"""Validator benchmark, one core: (a) orjson parse, (b) fhir.resources base validation (the models built for
the Bundle and every entry resource, as before the prescreen spared them on valid input), (c) the full engine,
and side by side (d) the HL7 FHIR validator's base R4 validation of the same Bundles.

`python -m tests.bench.validator [--rounds N] [--hl7-warm K | --no-hl7]` prints Bundles/s and ms/Bundle
(p50/p99) for a 30-entry and a 300-entry TDDUI Bundle, how much Relais's rules add on top of the
fhir.resources parse (goal: at most +50%), and how many times faster Relais's full validation is than the
HL7 engine's, warm (goal: at least 20x). The HL7 engine runs in its own JVM (tests/reference/hl7), started
once, each Bundle validated K times to warm the JIT before the timed passes. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import orjson
from fhir.resources.R4B.bundle import Bundle

from services.validator.base import resource_class
from services.validator.logic import validate_bundle
from services.validator.ruleset import ruleset
from tests.fixtures.tddui import make_bundle


def models_parse(bundle: dict[str, Any]) -> None:
    """(b): the fhir.resources R4B models of the Bundle (without its resources), then of each resource."""
    entries = bundle.get("entry") or []
    Bundle.model_validate({**bundle, "entry": [{k: v for k, v in e.items() if k != "resource"} for e in entries]})
    for e in entries:
        resource = e["resource"]
        resource_class(resource["resourceType"]).model_validate(resource)  # type: ignore[union-attr]


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


HL7_SAMPLES = 5  # timed passes of each Bundle in the HL7 run (after the warm-up rounds)


def hl7_p50(raws: dict[int, bytes], warm: int) -> dict[int, float] | str:
    """p50 ms of the HL7 engine on each Bundle (size → JSON), warm; or why it could not run."""
    from tests.reference.hl7.harness import ReferenceUnavailable, validate_all

    corpus = {f"{size:04d}-{k}": raw for size, raw in raws.items() for k in range(HL7_SAMPLES)}
    try:
        results = validate_all(corpus, warm_rounds=warm, timeout_s=1800, quick_start=False)
    except ReferenceUnavailable as exc:
        return str(exc).splitlines()[0]
    return {size: statistics.median(results[f"{size:04d}-{k}"].ms for k in range(HL7_SAMPLES)) for size in raws}


def run(rounds: int = 300, hl7_warm: int | None = 5) -> list[str]:
    """The benchmark's report lines (`hl7_warm` None: without the HL7 engine)."""
    ruleset()  # compile the rules before timing
    lines = []
    raws = {size: orjson.dumps(make_bundle(size, seed=1)) for size in (30, 300)}
    hl7 = hl7_p50(raws, hl7_warm) if hl7_warm is not None else "not run (--no-hl7)"
    for size in (30, 300):
        raw = raws[size]
        n = rounds if size == 30 else max(20, rounds // 10)
        cases = {
            "(a) orjson parse": lambda raw=raw: orjson.loads(raw),
            "(b) fhir.resources base": lambda raw=raw: models_parse(orjson.loads(raw)),
            "(c) full engine": lambda raw=raw: validate_bundle(raw),
        }
        results = measure(cases, n)
        for label, (rate, p50, p99) in results.items():
            lines.append(f"{size:>3}-entry {label:<24} {rate:8.0f} Bundles/s  p50 {p50:7.2f} ms  p99 {p99:7.2f} ms")
        base, full = results["(b) fhir.resources base"][1], results["(c) full engine"][1]
        lines.append(f"{size:>3}-entry profile rules add {100 * (full - base) / base:.0f}% on top of (b) (p50; "
                     "goal <= 50%)")
        if isinstance(hl7, dict):
            lines.append(f"{size:>3}-entry (d) HL7 validator, base R4 {1000 / hl7[size]:8.1f} Bundles/s  "
                         f"p50 {hl7[size]:7.2f} ms  (warm, {HL7_SAMPLES} passes)")
            lines.append(f"{size:>3}-entry Relais full validation is {hl7[size] / full:.1f}x faster than (d) "
                         "(p50; goal >= 20x)")
    if not isinstance(hl7, dict):
        lines.append(f"(d) HL7 validator: {hl7}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.validator", description=__doc__)
    parser.add_argument("--rounds", type=int, default=300, help="Bundles per 30-entry measurement")
    parser.add_argument("--hl7-warm", type=int, default=5, help="HL7 warm-up validations of each Bundle")
    parser.add_argument("--no-hl7", action="store_true", help="leave the HL7 validator out")
    args = parser.parse_args()
    lines = run(args.rounds, None if args.no_hl7 else args.hl7_warm)
    print("\n".join(["== Relais validator benchmark (one core) ==", *lines]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
