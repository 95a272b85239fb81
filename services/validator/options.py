"""What an operator (or a DUI vendor testing an export) may change about validation."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.core.outcome import Issue

if TYPE_CHECKING:
    from services.core.settings import Settings


@dataclass(frozen=True, slots=True)
class ValidationOptions:
    """Options of `validate_bundle()`; the defaults are the strict, documented behaviour."""

    warnings_as_errors: bool = False  # every warning rejects the transfer too
    ignore_rules: frozenset[str] = frozenset()  # rule ids (or prefixes ending in '/') to drop
    language: str = "en"  # "fr" for French diagnostics

    @classmethod
    def of(cls, warnings_as_errors: bool = False, ignore_rules: Iterable[str] = (),
           language: str | None = None) -> ValidationOptions:
        """Options from plain values (settings, CLI flags, an Accept-Language header)."""
        return cls(warnings_as_errors, frozenset(r.strip() for r in ignore_rules if r.strip()),
                   language_of(language))

    def apply(self, issues: list[Issue]) -> list[Issue]:
        """Drop ignored rules, then raise warnings to errors when asked."""
        if self.ignore_rules:
            issues = [i for i in issues if not self._ignored(i.rule)]
        if self.warnings_as_errors:
            issues = [dataclasses.replace(i, severity="error") if i.severity == "warning" else i for i in issues]
        return issues

    def _ignored(self, rule: str | None) -> bool:
        if rule is None:
            return False
        if rule in self.ignore_rules:
            return True
        return any(r.endswith("/") and rule.startswith(r) for r in self.ignore_rules)


def validation_options(settings: Settings, language: str | None = None) -> ValidationOptions:
    """The operator's validation options (RELAIS_VALIDATION_*), in the given language."""
    return ValidationOptions.of(settings.validation_warnings_as_errors, settings.validation_ignore_rules, language)


def language_of(header: str | None) -> str:
    """'fr' when an Accept-Language value prefers French over English, else 'en'."""
    if not header:
        return "en"
    best, best_q = "en", -1.0
    for part in header.split(","):
        tag, _, params = part.strip().partition(";")
        q = 1.0
        params = params.strip()
        if params.startswith("q="):
            try:
                q = float(params[2:])
            except ValueError:
                q = 0.0
        primary = tag.strip().lower().split("-")[0]
        if primary in ("fr", "en") and q > best_q:
            best, best_q = primary, q
    return best
