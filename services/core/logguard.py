"""Logs that cannot hurt the service: repeated lines rate-limited, a failed write never raised to the caller.

A flood (a client hammering a refusal, `accept()` failing for want of file descriptors) must not
fill the disk with one line repeated millions of times, and a full disk under the log must not turn
a request into a 500: the line is lost, the request is answered.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, MutableMapping
from typing import Any, TextIO

import structlog

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
