"""The error taxonomy: the retry decision lives on the type (a TransientError waits and retries, anything else
does not), never in `if` chains at call sites."""

from __future__ import annotations

from typing import Any

from services.core.outcome import error, operation_outcome


class RelaisError(Exception):
    """Base of every error Relais raises on purpose."""

    def outcome(self) -> dict[str, Any]:
        """The error as a FHIR OperationOutcome."""
        return operation_outcome([error("processing", str(self))])


class TransientError(RelaisError):
    """When waiting may help: network trouble, timeouts, 5xx, 408, 429, a broker that is down."""


class LetGo(TransientError):
    """When a record gives way unattempted — the process stops, or its partition is handed over: nothing failed,
    it is read again (here or by the partition's next holder)."""


class PermanentError(RelaisError):
    """When retrying cannot help: bad content, a 4xx from a target, a misconfiguration."""


class ConfigurationError(PermanentError):
    """When a settings value or a configuration file makes no sense; the message says how to fix it."""


class BusUnavailable(TransientError):
    """When Kafka (or the embedded log) does not acknowledge in time."""
