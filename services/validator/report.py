"""`relais validate PATH...`: the validation engine on files, with a readable or a JSON-lines report."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

import orjson

from services.core.outcome import Issue, operation_outcome
from services.validator.logic import validate_bundle
from services.validator.options import ValidationOptions

# Report lines around the diagnostics, which come in the options' language already.
_WORDS = {
    "en": ("valid", "INVALID", "{errors} error(s), {others} warning(s)/note(s)"),
    "fr": ("valide", "INVALIDE", "{errors} erreur(s), {others} avertissement(s)/note(s)"),
}


def bundle_files(paths: Sequence[str]) -> Iterator[Path]:
    """Every file named, and every *.json under the directories named, in a stable order."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*.json") if p.is_file())
        else:
            yield path


def main(paths: Sequence[str], fmt: str = "text", out: TextIO | None = None,
         options: ValidationOptions | None = None) -> int:
    """Validate each file; 0 when all are valid, 1 when any has an error, 2 when a path is unusable."""
    out = out or sys.stdout
    options = options or ValidationOptions()
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        print(f"relais validate: no such file or directory: {', '.join(missing)}", file=sys.stderr)
        return 2
    any_error = False
    count = 0
    for path in bundle_files(paths):
        count += 1
        try:
            data = path.read_bytes()
        except OSError as exc:
            print(f"relais validate: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        issues = validate_bundle(data, options)
        valid = not any(i.is_error for i in issues)
        any_error |= not valid
        if fmt == "json":
            line = {"path": str(path), "valid": valid, "outcome": operation_outcome(issues)}
            out.write(orjson.dumps(line).decode() + "\n")
        else:
            _write_text(out, path, valid, issues, options.language)
    if count == 0:
        print("relais validate: no *.json files found in the given directories", file=sys.stderr)
        return 2
    return 1 if any_error else 0


def _write_text(out: TextIO, path: Path, valid: bool, issues: list[Issue], lang: str) -> None:
    yes, no, counts = _WORDS.get(lang, _WORDS["en"])
    errors = sum(i.is_error for i in issues)
    out.write(f"{path}: {yes if valid else no} ({counts.format(errors=errors, others=len(issues) - errors)})\n")
    for issue in issues:
        where = ", ".join(issue.expression) or "Bundle"
        rule = f" [{issue.rule}]" if issue.rule else ""
        out.write(f"  {issue.severity:<11} {where}: {issue.diagnostics}{rule}\n")
