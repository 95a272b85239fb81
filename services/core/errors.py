"""The error taxonomy: the retry decision lives on the type, not in `if` chains at call sites."""

from __future__ import annotations

from typing import Any, ClassVar

from services.core.outcome import Issue, error, operation_outcome


class RelaisError(Exception):
    """Base of every error Relais raises on purpose."""

    retryable: ClassVar[bool] = False

    def outcome(self) -> dict[str, Any]:
        """The error as a FHIR OperationOutcome."""
        return operation_outcome([error("processing", str(self))])


class TransientError(RelaisError):
    """When waiting may help: network trouble, timeouts, 5xx, 408, 429, a broker that is down."""

    retryable = True


class PermanentError(RelaisError):
    """When retrying cannot help: bad content, a 4xx from a target, a misconfiguration."""


class InvalidBundle(PermanentError):
    """When a Bundle breaks the TDDUI rules; carries every issue found."""

    def __init__(self, issues: list[Issue]) -> None:
        super().__init__(f"{sum(i.is_error for i in issues)} error(s) in Bundle")
        self.issues = issues

    def outcome(self) -> dict[str, Any]:
        """Every issue found, as an OperationOutcome."""
        return operation_outcome(self.issues)


class ConfigurationError(PermanentError):
    """When a settings value or a configuration file makes no sense; the message says how to fix it."""


class BusUnavailable(TransientError):
    """When Kafka (or the embedded log) does not acknowledge in time."""
