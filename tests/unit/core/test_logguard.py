"""Repeated log lines are summarised, and a log that cannot be written never raises."""

from __future__ import annotations

import errno
import io
import logging

import pytest
import structlog

from services.core.logguard import RepeatBudget, RepeatFilter, RepeatLimiter, SafeStream


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_kind_gets_its_burst_per_window_then_a_count_of_what_was_held_back() -> None:
    clock = Clock()
    budget = RepeatBudget(burst=3, window_s=10, clock=clock)
    assert [budget.admit("accept failed") for _ in range(5)] == [(True, 0)] * 3 + [(False, 0)] * 2
    assert budget.admit("another kind") == (True, 0)  # kinds are counted apart
    clock.now = 10.5
    assert budget.admit("accept failed") == (True, 2)  # next window: written, with the 2 held back


def test_structlog_processor_drops_repeated_errors_but_never_info_lines() -> None:
    limiter = RepeatLimiter(RepeatBudget(burst=2, window_s=60))
    for _ in range(5):
        limiter(None, "info", {"event": "transfer accepted", "level": "info"})
    limiter(None, "error", {"event": "boom", "level": "error"})
    limiter(None, "error", {"event": "boom", "level": "error"})
    with pytest.raises(structlog.DropEvent):
        limiter(None, "error", {"event": "boom", "level": "error"})


def test_stdlib_filter_limits_warnings_by_message_template() -> None:
    flt = RepeatFilter(RepeatBudget(burst=1, window_s=60))

    def record(level: int) -> logging.LogRecord:
        return logging.LogRecord("asyncio", level, __file__, 1, "socket.accept() out of system resource", (), None)

    assert flt.filter(record(logging.ERROR)) and not flt.filter(record(logging.ERROR))
    assert flt.filter(record(logging.INFO))


class FullDisk(io.StringIO):
    def write(self, _: str) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_stream_that_cannot_be_written_loses_the_line_and_does_not_raise() -> None:
    stream = SafeStream(FullDisk())
    assert stream.write("a line\n") == 0
    stream.flush()
    assert stream.lost == 1
