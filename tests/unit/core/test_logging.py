"""Every log line — ours and third-party libraries' — goes through one chain: JSON, masked; repeated lines are
summarised, and a log that cannot be written never raises."""

from __future__ import annotations

import errno
import io
import json
import logging
import subprocess
import sys
import textwrap

import pytest
import structlog

from services.core.logging import RepeatBudget, RepeatFilter, RepeatLimiter, SafeStream

# Run in a child interpreter: logging configuration is process-global and pytest owns this one's.
SCRIPT = textwrap.dedent("""
    import logging, uvicorn
    from services.core.logging import configure_logging, get_logger
    from services.core.settings import Settings

    configure_logging(Settings(log_format="json", log_level="info", auth_disabled=True))
    # What uvicorn does when a server is built by the launcher (log_config=None keeps our handler).
    uvicorn.Config(app=None, log_config=None, log_level="warning")
    get_logger("relais.test").info("ours", patient="Jeanne Dupont", contact="jeanne.dupont@example.org")
    logging.getLogger("aiokafka.consumer").warning("coordinator lost for 1 85 05 75 123 456 78")
    logging.getLogger("uvicorn.error").error("client jeanne.dupont@example.org sent garbage")
""")


def test_third_party_lines_are_json_and_masked_like_ours() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True)
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 3, done.stderr
    ours, kafka, uv = lines
    assert ours["event"] == "ours" and ours["patient"] == "[masked]" and ours["contact"] == "[email]"
    assert kafka["level"] == "warning" and kafka["logger"] == "aiokafka.consumer"
    assert "[nir]" in kafka["event"] and "123 456" not in kafka["event"]
    assert uv["level"] == "error" and "[email]" in uv["event"] and "example.org" not in uv["event"]
    assert all("timestamp" in line for line in lines)


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
