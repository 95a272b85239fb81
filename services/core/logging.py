"""structlog, configured once per process: JSON off a terminal, never a Bundle or personal data.

And logs that cannot hurt the service: repeated lines rate-limited, a failed write never raised to the caller.
A flood (a client hammering a refusal, `accept()` failing for want of file descriptors) must not fill the
disk with one line repeated millions of times, and a full disk under the log must not turn a request into a
500: the line is lost, the request is answered.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, MutableMapping
from typing import Any, TextIO

import structlog

from services.core.settings import Settings

# Keys that could carry health data. A record's log line names transfers, FINESS numbers, sizes and
# durations; if code ever binds one of these by mistake, the value is replaced before it is written.
SENSITIVE_KEYS = frozenset(
    {"body", "bundle", "payload", "resource", "name", "family", "given", "birthdate", "birth_date", "ins",
     "nir", "address", "telecom", "token", "authorization", "patient", "usager", "first_name", "last_name",
     "firstname", "lastname", "nom", "prenom", "prénom", "nom_naissance", "date_naissance", "dob", "phone",
     "email", "mail", "ins_nir", "matricule", "secret", "password", "cookie", "data", "content"}
)
_MASK = "[masked]"
# Values that look like personal data whatever key carries them (an exception message, a diagnostic):
# an INS-NIR / NIA (13 digits + optional 2-digit key, spaces allowed), a date on its own (birth dates; a
# timestamp with a time part is left alone), an e-mail address, a French phone number.
_PATTERNS = (
    (re.compile(r"(?<![\w-])[12478]\s?\d{2}\s?\d{2}\s?(?:\d{2}|2[ABab])\s?\d{3}\s?\d{3}(?:\s?\d{2})?(?![\w-])"),
     "[nir]"),
    (re.compile(r"(?<![\w-])(?:1[89]|20)\d{2}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])(?![\w:-]|T\d)"), "[date]"),
    (re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+"), "[email]"),
    (re.compile(r"(?<![\w-])(?:\+33\s?|0)[1-9](?:[\s.]?\d{2}){4}(?![\w-])"), "[phone]"),
)
_EXEMPT = frozenset({"timestamp", "level", "logger"})


def mask_text(text: str) -> str:
    """`text` with anything shaped like an INS/NIR, a bare date, an e-mail or a phone number masked."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _mask_value(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return mask_text(value)
    if depth > 4:
        return value
    if isinstance(value, dict):
        return {k: _MASK if str(k).lower() in SENSITIVE_KEYS else _mask_value(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_mask_value(v, depth + 1) for v in value]
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return value


def _mask_sensitive(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: drop the values of known sensitive keys, mask personal-data shapes elsewhere."""
    for key in list(event):
        if key.lower() in SENSITIVE_KEYS:
            event[key] = _MASK
        elif key not in _EXEMPT:
            event[key] = _mask_value(event[key])
    return event


BURST = 5  # lines of one kind let through per window...
WINDOW_S = 10.0  # ...then one summary line with the count of those held back
MAX_KINDS = 1024  # distinct kinds remembered (oldest forgotten first)
QUIET_LEVELS = frozenset({"debug", "info"})  # one line per record is the log's job: only warnings+ are limited


class RepeatBudget:
    """How many lines of each kind were written in the current window, and how many were held back."""

    def __init__(self, burst: int = BURST, window_s: float = WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst, self.window_s, self.clock = burst, window_s, clock
        self._kinds: OrderedDict[Hashable, list[float]] = OrderedDict()  # kind -> [window start, sent, held]

    def admit(self, kind: Hashable) -> tuple[bool, int]:
        """(write this line?, lines of this kind held back since the last one written)."""
        now = self.clock()
        entry = self._kinds.get(kind)
        if entry is None or now - entry[0] >= self.window_s:
            held = int(entry[2]) if entry is not None else 0
            self._kinds[kind] = [now, 1, 0]
            self._kinds.move_to_end(kind)
            while len(self._kinds) > MAX_KINDS:
                self._kinds.popitem(last=False)
            return True, held
        if entry[1] < self.burst:
            entry[1] += 1
            return True, 0
        entry[2] += 1
        return False, 0


class RepeatLimiter:
    """structlog processor: warnings and errors of one kind (logger, level, event) at most BURST per window."""

    def __init__(self, budget: RepeatBudget | None = None) -> None:
        self.budget = budget or RepeatBudget()

    def __call__(self, _: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        level = str(event.get("level") or method)
        if level in QUIET_LEVELS:
            return event
        write, held = self.budget.admit((event.get("logger"), level, str(event.get("event"))[:200]))
        if not write:
            raise structlog.DropEvent
        if held:
            event["repeated_lines_dropped"] = held
        return event


class RepeatFilter(logging.Filter):
    """The same limit for the standard library's loggers (asyncio, uvicorn, aiokafka)."""

    def __init__(self, budget: RepeatBudget | None = None) -> None:
        super().__init__()
        self.budget = budget or RepeatBudget()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        write, held = self.budget.admit((record.name, record.levelno, str(record.msg)[:200]))
        if write and held:
            record.msg = f"{record.msg} ({held} similar line(s) dropped)"
        return write


class SafeStream:
    """A text stream whose write and flush never raise: a line that cannot be written is lost, not fatal."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.lost = 0  # lines that could not be written (disk full, closed pipe, ...)

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except (OSError, ValueError):
            self.lost += 1
            return 0

    def flush(self) -> None:
        try:
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def isatty(self) -> bool:
        try:
            return self.stream.isatty()
        except (OSError, ValueError):
            return False

    def fileno(self) -> int:
        return self.stream.fileno()


def _processors(as_json: bool) -> tuple[list[structlog.types.Processor], structlog.types.Processor]:
    """The one chain every line goes through: (what enriches and masks it, what renders it)."""
    chain: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        _mask_sensitive,  # after format_exc_info: exception texts are masked too
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    )
    return chain, renderer


def configure_logging(settings: Settings) -> None:
    """Configure structlog and route the stdlib loggers (aiokafka, uvicorn, ...) through the same chain.

    Third-party libraries log through `logging`; their lines get the same timestamp, level, masking
    of personal data and JSON rendering as ours, so nothing reaches stderr around the masking.
    Idempotent.
    """
    level = getattr(logging, settings.log_level.upper())
    as_json = settings.log_format == "json" or (settings.log_format == "auto" and not sys.stderr.isatty())
    chain, renderer = _processors(as_json)
    stream: Any = SafeStream(sys.stderr)  # a log line that cannot be written must never fail a request
    structlog.configure(
        # A flood of one warning or error is summarised, not written a million times (ours; RepeatFilter
        # does the same for the stdlib lines, where structlog's DropEvent is not available).
        processors=[RepeatLimiter(), *chain, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.addFilter(RepeatFilter())
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, structlog.stdlib.ExtraAdder(), *chain],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(level, logging.WARNING))
    # aiokafka logs every coordinator hiccup at WARNING/ERROR; keep them, but not its INFO chatter.
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        # uvicorn installs its own handlers when it configures itself; ours (on the root) is the only one.
        uv = logging.getLogger(name)
        uv.handlers[:] = []
        uv.propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger named for its module."""
    return structlog.get_logger(name)  # type: ignore[no-any-return]
