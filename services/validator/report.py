"""`relais validate PATH...`: the validation engine on files, with a readable or a JSON-lines report."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

import orjson

from services.core.outcome import Issue, operation_outcome
from services.validator.logic import validate_bundle


def bundle_files(paths: Sequence[str]) -> Iterator[Path]:
    """Every file named, and every *.json under the directories named, in a stable order."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*.json") if p.is_file())
        else:
            yield path


def main(paths: Sequence[str], fmt: str = "text", out: TextIO | None = None) -> int:
    """Validate each file; 0 when all are valid, 1 when any has an error, 2 when a path is unusable."""
    out = out or sys.stdout
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        print(f"relais validate: no such file or directory: {', '.join(missing)}", file=sys.stderr)
        return 2
    any_error = False
    count = 0
    for path in bundle_files(paths):
        count += 1
        issues = validate_bundle(path.read_bytes())
        valid = not any(i.is_error for i in issues)
        any_error |= not valid
        if fmt == "json":
            line = {"path": str(path), "valid": valid, "outcome": operation_outcome(issues)}
            out.write(orjson.dumps(line).decode() + "\n")
        else:
            _write_text(out, path, valid, issues)
    if count == 0:
        print("relais validate: no *.json files found in the given directories", file=sys.stderr)
        return 2
    return 1 if any_error else 0


def _write_text(out: TextIO, path: Path, valid: bool, issues: list[Issue]) -> None:
    errors = sum(i.is_error for i in issues)
    verdict = "valid" if valid else "INVALID"
    out.write(f"{path}: {verdict} ({errors} error(s), {len(issues) - errors} warning(s)/note(s))\n")
    for issue in issues:
        where = ", ".join(issue.expression) or "Bundle"
        rule = f" [{issue.rule}]" if issue.rule else ""
        out.write(f"  {issue.severity:<11} {where}: {issue.diagnostics}{rule}\n")
