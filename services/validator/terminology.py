"""Value sets compiled for membership tests, and the binding check that uses them.

A value set is known per code system: the codes it takes from that system, or every code of it
(`None`, for national or HL7 systems Relais cannot enumerate offline). An *open* value set is a
national one whose content is unknown offline: any coding with a system and a code passes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# FHIR R4 `code`: no leading, trailing or doubled whitespace. No code system holds anything else, so a
# string bound to a value set must at least read as a code, even when the value set is not enumerable.
_CODE = re.compile(r"[^\s]+(\s[^\s]+)*")


@dataclass(slots=True)
class ValueSet:
    """What a value set admits, by code system."""

    url: str
    codes: dict[str, frozenset[str] | None] = field(default_factory=dict)
    open: bool = False  # content not enumerable offline: any system/code accepted

    def admits(self, system: object, code: object) -> bool:
        """True when (system, code) is in the value set (as far as Relais can know offline)."""
        if not isinstance(code, str) or not code:
            return False
        if isinstance(system, str) and system in self.codes:
            allowed = self.codes[system]
            return allowed is None or code in allowed
        return self.open and isinstance(system, str) and bool(system)

    def admits_code(self, code: object) -> bool:
        """For `code` elements (no system): True when some system of the value set has this code."""
        if not isinstance(code, str) or not _CODE.fullmatch(code):
            return False
        if self.open:
            return True
        return any(allowed is None or code in allowed for allowed in self.codes.values())

    def describe(self, limit: int = 12) -> tuple[str, list[str]]:
        """('codes', [...]) when enumerable and short, else ('systems', [...])."""
        if not self.open and all(a is not None for a in self.codes.values()):
            codes = sorted({c for a in self.codes.values() if a for c in a})
            if len(codes) <= limit:
                return "codes", codes
        return "systems", sorted(self.codes) or ["(national terminology)"]


def compile_value_sets(
    code_systems: Mapping[str, Iterable[str]], definitions: Iterable[Mapping[str, Any]]
) -> dict[str, ValueSet]:
    """Every value set of the rule files, by canonical URL, with includes and excludes resolved."""
    raw = {d["url"]: d for d in definitions}
    done: dict[str, ValueSet] = {}

    def build(url: str, seen: tuple[str, ...]) -> ValueSet:
        if url in done:
            return done[url]
        if url in seen or url not in raw:
            raise ValueError(f"value set {url} is undefined or includes itself")
        d = raw[url]
        vs = ValueSet(url, open=bool(d.get("external")) and not d.get("systems") and not d.get("include"))
        for system in d.get("systems") or ():
            vs.codes[system] = None
        for inc in d.get("include") or ():
            if "valueSet" in inc:
                sub = build(inc["valueSet"], (*seen, url))
                vs.open |= sub.open
                for system, known in sub.codes.items():
                    _merge(vs, system, known)
            else:
                system = inc["system"]
                listed: Iterable[str] | None = inc.get("codes")
                if listed is None and system in code_systems:
                    listed = list(code_systems[system])
                _merge(vs, system, None if listed is None else frozenset(str(c) for c in listed))
        for exc in d.get("exclude") or ():
            current = vs.codes.get(exc["system"])
            if current is not None:
                vs.codes[exc["system"]] = current - frozenset(exc["codes"])
        done[url] = vs
        return vs

    for url in raw:
        build(url, ())
    return done


def _merge(vs: ValueSet, system: str, codes: frozenset[str] | None) -> None:
    if system in vs.codes:
        current = vs.codes[system]
        vs.codes[system] = None if current is None or codes is None else current | codes
    else:
        vs.codes[system] = codes
