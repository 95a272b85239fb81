"""FHIR OperationOutcome: the one shape every Relais failure (and acceptance) is reported in."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

Severity = Literal["fatal", "error", "warning", "information"]

# The Relais canonical base, used for the extension that names the rule behind an issue.
RELAIS_CANONICAL = "https://relais.esms.fr/fhir"
RULE_EXTENSION_URL = f"{RELAIS_CANONICAL}/StructureDefinition/issue-rule"
# The profile (canonical URL) whose rule fired, when the rule comes from a FHIR profile.
PROFILE_EXTENSION_URL = f"{RELAIS_CANONICAL}/StructureDefinition/issue-profile"


@dataclass(frozen=True, slots=True)
class Issue:
    """One finding: what is wrong (`diagnostics`), where (`expression`, FHIRPath) and which rule said so."""

    severity: Severity
    code: str  # FHIR IssueType: invalid, structure, required, value, processing, security, ...
    diagnostics: str
    expression: tuple[str, ...] = field(default_factory=tuple)
    rule: str | None = None
    profile: str | None = None  # canonical URL of the profile whose rule fired, if any

    @property
    def is_error(self) -> bool:
        """True when the issue blocks the transfer (fatal or error)."""
        return self.severity in ("fatal", "error")

    def to_fhir(self) -> dict[str, Any]:
        """The issue as an `OperationOutcome.issue` JSON object."""
        out: dict[str, Any] = {"severity": self.severity, "code": self.code, "diagnostics": self.diagnostics}
        if self.expression:
            out["expression"] = list(self.expression)
        extensions = []
        if self.rule:
            extensions.append({"url": RULE_EXTENSION_URL, "valueString": self.rule})
        if self.profile:
            extensions.append({"url": PROFILE_EXTENSION_URL, "valueCanonical": self.profile})
        if extensions:
            out["extension"] = extensions
        return out

    @classmethod
    def from_fhir(cls, data: dict[str, Any]) -> Issue:
        """Rebuild an issue from its `OperationOutcome.issue` JSON (as read back from Kafka or the ledger)."""
        rule = next(
            (e.get("valueString") for e in data.get("extension", []) if e.get("url") == RULE_EXTENSION_URL),
            None,
        )
        profile = next(
            (e.get("valueCanonical") for e in data.get("extension", []) if e.get("url") == PROFILE_EXTENSION_URL),
            None,
        )
        return cls(
            severity=data.get("severity", "error"),
            code=data.get("code", "processing"),
            diagnostics=data.get("diagnostics", ""),
            expression=tuple(data.get("expression", ())),
            rule=rule,
            profile=profile,
        )


def error(code: str, diagnostics: str, *expression: str, rule: str | None = None) -> Issue:
    """Shorthand for an error issue."""
    return Issue("error", code, diagnostics, tuple(expression), rule)


def warning(code: str, diagnostics: str, *expression: str, rule: str | None = None) -> Issue:
    """Shorthand for a warning issue."""
    return Issue("warning", code, diagnostics, tuple(expression), rule)


def information(diagnostics: str, *expression: str) -> Issue:
    """Shorthand for an informational issue."""
    return Issue("information", "informational", diagnostics, tuple(expression))


def operation_outcome(issues: Iterable[Issue]) -> dict[str, Any]:
    """An OperationOutcome resource (JSON) holding the issues; FHIR requires at least one issue."""
    rendered = [i.to_fhir() for i in issues]
    if not rendered:
        rendered = [information("All OK").to_fhir()]
    return {"resourceType": "OperationOutcome", "issue": rendered}


def has_errors(issues: Iterable[Issue]) -> bool:
    """True when any issue blocks the transfer."""
    return any(i.is_error for i in issues)


def issues_of(outcome: Any) -> list[dict[str, Any]]:
    """The errors and warnings of an OperationOutcome read back as JSON (the ledger's, a target's): severity, code,
    FHIRPath `expression`, Relais `rule`, diagnostics. Tolerant: whatever is malformed is passed over, not raised."""
    if not isinstance(outcome, dict):
        return []
    out = []
    for issue in outcome.get("issue") or []:
        if not isinstance(issue, dict) or issue.get("severity") == "information":
            continue
        rule = next((str(x.get("valueString")) for x in issue.get("extension") or []
                     if isinstance(x, dict) and str(x.get("url", "")).endswith("/issue-rule")), None)
        out.append({"severity": str(issue.get("severity", "error")), "code": issue.get("code"),
                    "expression": [str(x) for x in issue.get("expression") or []], "rule": rule,
                    "diagnostics": str(issue.get("diagnostics", ""))})
    return out
