"""structlog, configured once per process: JSON off a terminal, never a Bundle or personal data."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from services.core.settings import Settings

# Keys that could carry health data. A record's log line names transfers, FINESS numbers, sizes and
# durations; if code ever binds one of these by mistake, the value is replaced before it is written.
SENSITIVE_KEYS = frozenset(
    {"body", "bundle", "payload", "resource", "name", "family", "given", "birthdate", "birth_date", "ins",
     "nir", "address", "telecom", "token", "authorization"}
)


def _mask_sensitive(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in SENSITIVE_KEYS.intersection(event):
        event[key] = "[masked]"
    return event


def configure_logging(settings: Settings) -> None:
    """Configure structlog and the stdlib root logger for this process (idempotent)."""
    level = getattr(logging, settings.log_level.upper())
    as_json = settings.log_format == "json" or (settings.log_format == "auto" and not sys.stderr.isatty())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _mask_sensitive,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(level, logging.WARNING), stream=sys.stderr, force=True)
    # aiokafka logs every coordinator hiccup at WARNING/ERROR; keep them, but not its INFO chatter.
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger named for its module."""
    return structlog.get_logger(name)  # type: ignore[no-any-return]
