"""Validator benchmark, one core: (a) orjson parse, (b) fhir.resources base validation (the models built for
the Bundle and every entry resource, as before the prescreen spared them on valid input), (c) the full engine,
and side by side (d) the HL7 FHIR validator's base R4 validation of the same Bundles.

`python -m tests.bench.validator [--rounds N] [--hl7-warm K | --no-hl7] [--repeats R] [--hl7-300 S]` prints
Bundles/s and ms/Bundle (p50/p99) for a 30-entry and a 300-entry TDDUI Bundle, how much Relais's rules add
on top of the fhir.resources parse (goal: at most +50%), and how many times faster Relais's full validation
is than the HL7 engine's, warm (goal: at least 20x). The HL7 engine runs in its own JVM (tests/reference/hl7):
each of R repeats starts one, validates the 30-entry Bundle K times per pass to warm the JIT, then times
HL7_SAMPLES passes; Relais is timed just before and just after, so both see the same load on a shared
machine. Every repeat's figures and the load average are printed, and the ratio is the median of the
repeats' ratios. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import orjson
from fhir.resources.R4B.bundle import Bundle

from services import validator
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


HL7_SAMPLES = 15  # timed passes of the 30-entry Bundle in each HL7 run (after the warm-up rounds)
HL7_SAMPLES_300 = 3  # of the 300-entry Bundle (about 7 s each), in one run of its own


def hl7_times(raw: bytes, samples: int, warm: int) -> list[float] | str:
    """ms of each timed HL7 validation of the Bundle `raw` in one fresh JVM, warm; or why it could not run."""
    from tests.reference.hl7.harness import ReferenceUnavailable, validate_all

    try:
        results = validate_all({f"{k:03d}": raw for k in range(samples)}, warm_rounds=warm, timeout_s=1800,
                               quick_start=False)
    except ReferenceUnavailable as exc:
        return str(exc).splitlines()[0]
    return [results[f"{k:03d}"].ms for k in range(samples)]


def _load() -> str:
    return "load {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())


def side_by_side(raw: bytes, size: int, repeats: int, samples: int, warm: int, rounds: int) -> list[str]:
    """Relais's full validation vs the HL7 engine, as a ratio of p50s, `repeats` times.

    Each repeat starts a fresh JVM (warm-up, then `samples` timed passes) and times Relais on the same
    Bundle just before and just after it, so both see the same load on this shared machine; the ratio
    reported is the median of the repeats' ratios, and every repeat's figures are printed.
    """
    lines: list[str] = []
    ratios: list[float] = []
    for r in range(repeats):
        before = measure({"full": lambda: validate_bundle(raw)}, rounds // 2, chunks=1)["full"]
        load = _load()
        hl7 = hl7_times(raw, samples, warm)
        if isinstance(hl7, str):
            return [f"(d) HL7 validator: {hl7}"]
        after = measure({"full": lambda: validate_bundle(raw)}, rounds // 2, chunks=1)["full"]
        relais = statistics.median([before[1], after[1]])
        hl7_p50 = statistics.median(hl7)
        ratios.append(hl7_p50 / relais)
        lines.append(f"{size:>3}-entry repeat {r + 1}: Relais p50 {before[1]:.2f} / {after[1]:.2f} ms (before / after) "
                     f"vs HL7 p50 {hl7_p50:.1f} ms (min {min(hl7):.1f}, max {max(hl7):.1f}; {samples} passes, "
                     f"warm {warm}) = {ratios[-1]:.1f}x  [{load}]")
    if repeats > 1:
        lines.append(f"{size:>3}-entry Relais full validation vs (d) HL7 base R4: median "
                     f"{statistics.median(ratios):.1f}x faster (min {min(ratios):.1f}x, max {max(ratios):.1f}x "
                     f"over {repeats} repeats; goal >= 20x)")
    else:
        lines.append(f"{size:>3}-entry Relais full validation is {ratios[0]:.1f}x faster than (d) (goal >= 20x)")
    return lines


def run(rounds: int = 300, hl7_warm: int | None = 5, repeats: int = 5, samples_300: int = HL7_SAMPLES_300) -> list[str]:
    """The benchmark's report lines (`hl7_warm` None: without the HL7 engine)."""
    ruleset()  # compile the rules before timing
    mode = ("compiled by mypyc (services/validator/_native)" if validator.COMPILED
            else "plain Python (no current build: python -m services.validator.native)")
    lines = [f"[{_load()} at start; the validator runs {mode}]"]
    raws = {size: orjson.dumps(make_bundle(size, seed=1)) for size in (30, 300)}
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
    if hl7_warm is None:
        lines.append("(d) HL7 validator: not run (--no-hl7)")
        return lines
    lines.extend(side_by_side(raws[30], 30, repeats, HL7_SAMPLES, hl7_warm, rounds))
    if samples_300 > 0:
        lines.extend(side_by_side(raws[300], 300, 1, samples_300, min(hl7_warm, 2), max(20, rounds // 10)))
    lines.append(f"[{_load()} at end]")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.validator", description=__doc__)
    parser.add_argument("--rounds", type=int, default=300, help="Bundles per 30-entry measurement")
    parser.add_argument("--hl7-warm", type=int, default=5, help="HL7 warm-up validations of each Bundle")
    parser.add_argument("--no-hl7", action="store_true", help="leave the HL7 validator out")
    parser.add_argument("--repeats", type=int, default=5,
                        help="HL7 runs (one JVM each) at 30 entries, Relais timed before and after each")
    parser.add_argument("--hl7-300", type=int, default=HL7_SAMPLES_300,
                        help="timed HL7 passes of the 300-entry Bundle (about 7 s each; 0: skip)")
    args = parser.parse_args()
    lines = run(args.rounds, None if args.no_hl7 else args.hl7_warm, args.repeats, args.hl7_300)
    print("\n".join(["== Relais validator benchmark (one core) ==", *lines]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
