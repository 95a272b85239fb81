"""`relais send`: post one Bundle or a whole directory to a Relais ingress — bounded, resumable, reported.

When an ESSMS changes DUI software thousands of records move at once. This tool posts them with
bounded concurrency, shows progress (count, rate, ETA), keeps a journal so that a re-run after an
interruption skips what was already accepted, and ends with a report: accepted, rejected (with the
reason Relais gave) and failed (network, or Relais unavailable after retries).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx
import orjson

from services.validator.report import bundle_files

RETRYABLE = frozenset({429, 502, 503, 504})
MAX_TRIES = 5


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one file."""

    path: str
    digest: str
    result: str  # accepted | rejected | failed | skipped
    status: int | None = None
    transfer_id: str | None = None
    reason: str | None = None


@dataclass
class Report:
    """Counts and the rejected/failed details, as printed at the end."""

    outcomes: list[Outcome] = field(default_factory=list)
    interrupted: bool = False
    not_sent: int = 0

    def count(self, result: str) -> int:
        """How many files ended with `result`."""
        return sum(o.result == result for o in self.outcomes)

    def render(self) -> str:
        """The human-readable summary."""
        lines = [f"accepted: {self.count('accepted')}",
                 f"skipped (accepted in an earlier run): {self.count('skipped')}",
                 f"rejected: {self.count('rejected')}", f"failed: {self.count('failed')}"]
        if self.interrupted:
            lines.append(f"not sent (interrupted): {self.not_sent} — run the same command again to continue")
        for o in self.outcomes:
            if o.result in ("rejected", "failed"):
                lines.append(f"  {o.result} {o.path}: {o.status or '-'} {o.reason}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """The report as JSON (for --report FILE)."""
        return {"accepted": self.count("accepted"), "skipped": self.count("skipped"),
                "rejected": self.count("rejected"), "failed": self.count("failed"),
                "interrupted": self.interrupted, "not_sent": self.not_sent,
                "files": [_as_dict(o) for o in self.outcomes]}


def _as_dict(o: Outcome) -> dict[str, Any]:
    return {k: getattr(o, k) for k in Outcome.__slots__}


class Journal:
    """An append-only JSON-lines file: one line per accepted file (by content hash), fsync'd."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.accepted: dict[str, str] = {}
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue  # a torn last line from a crash: that file is simply sent again
                self.accepted[entry["digest"]] = entry["transfer_id"]
        self._file: TextIO = path.open("a", encoding="utf-8")

    def record(self, outcome: Outcome) -> None:
        """Remember an accepted file before moving on, so a crash right after cannot resend it."""
        self._file.write(orjson.dumps({"digest": outcome.digest, "path": outcome.path,
                                       "transfer_id": outcome.transfer_id}).decode() + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.accepted[outcome.digest] = outcome.transfer_id or ""

    def close(self) -> None:
        """Close the journal file."""
        self._file.close()


class Progress:
    """A one-line progress display on a terminal; a line every few seconds otherwise."""

    def __init__(self, total: int, out: TextIO) -> None:
        self.total, self.out, self.done = total, out, 0
        self.started = time.monotonic()
        self.tty = out.isatty()
        self._last = 0.0

    def step(self) -> None:
        """One more file done."""
        self.done += 1
        now = time.monotonic()
        if self.tty or now - self._last >= 5 or self.done == self.total:
            self._last = now
            elapsed = max(now - self.started, 1e-6)
            rate = self.done / elapsed
            eta = (self.total - self.done) / rate if rate else 0
            width = 30
            filled = int(width * self.done / max(self.total, 1))
            bar = "#" * filled + "." * (width - filled)
            text = f"[{bar}] {self.done}/{self.total}  {rate:.1f}/s  ETA {eta:.0f}s"
            self.out.write(("\r" + text) if self.tty else text + "\n")
            self.out.flush()

    def finish(self) -> None:
        """End the progress line."""
        if self.tty:
            self.out.write("\n")


def digest_of(body: bytes) -> str:
    """The journal key of a file: its content, so a renamed file is still recognised."""
    return hashlib.sha256(body).hexdigest()


async def post_one(client: httpx.AsyncClient, url: str, headers: dict[str, str], path: Path, body: bytes,
                   digest: str) -> Outcome:
    """POST one file, retrying what Relais says may succeed later (429, 503, ...)."""
    reason = ""
    for attempt in range(MAX_TRIES):
        try:
            response = await client.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            reason = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(min(2 ** attempt, 10))
            continue
        if response.status_code == 202:
            return Outcome(str(path), digest, "accepted", 202, response.headers.get("X-Relais-Transfer-Id"))
        reason = _diagnostics(response)
        if response.status_code not in RETRYABLE:
            return Outcome(str(path), digest, "rejected", response.status_code, reason=reason)
        await asyncio.sleep(_retry_after(response, attempt))
    return Outcome(str(path), digest, "failed", reason=f"gave up after {MAX_TRIES} tries: {reason}")


def _diagnostics(response: httpx.Response) -> str:
    try:
        issues = response.json().get("issue", [])
        return "; ".join(f"{i.get('diagnostics', '')} [{', '.join(i.get('expression', []))}]".replace(" []", "")
                         for i in issues[:3])
    except (ValueError, AttributeError):
        return response.text[:200]


def _retry_after(response: httpx.Response, attempt: int) -> float:
    value = response.headers.get("Retry-After", "")
    return min(float(value), 60.0) if value.isascii() and value.isdigit() else min(2.0 ** attempt, 30.0)


async def send(paths: Sequence[Path], *, url: str, target: str, token: str | None, concurrency: int,
               journal: Journal, progress_out: TextIO) -> Report:
    """Send every file not already in the journal; returns the report."""
    headers = {"Content-Type": "application/fhir+json", "X-Relais-Target": target}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    endpoint = url.rstrip("/") + "/fhir"
    report = Report()
    progress = Progress(len(paths), progress_out)
    queue: asyncio.Queue[Path] = asyncio.Queue()
    for path in paths:
        queue.put_nowait(path)

    # Ctrl-C (or SIGTERM) stops taking new files; requests in flight finish and are journaled, so a
    # re-run resends nothing that was accepted. A second Ctrl-C stops at once.
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()

    def interrupt() -> None:
        if stopping.is_set():
            raise KeyboardInterrupt
        stopping.set()
        progress_out.write("\nrelais send: interrupted; finishing requests in flight (Ctrl-C again to abort)\n")

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupt)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty() and not stopping.is_set():
            path = queue.get_nowait()
            body = await asyncio.to_thread(path.read_bytes)
            digest = digest_of(body)
            if digest in journal.accepted:
                outcome = Outcome(str(path), digest, "skipped", transfer_id=journal.accepted[digest])
            else:
                outcome = await post_one(client, endpoint, headers, path, body, digest)
                if outcome.result == "accepted":
                    journal.record(outcome)
            report.outcomes.append(outcome)
            progress.step()

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(60, connect=10), limits=limits) as client:
            await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    progress.finish()
    report.interrupted = stopping.is_set()
    report.not_sent = queue.qsize()
    return report


def main(raw_paths: Sequence[str], *, url: str, target: str, token: str | None, concurrency: int,
         journal_path: str | None, report_path: str | None) -> int:
    """`relais send`: 0 when every file is accepted (now or before), 1 when any is not, 2 on usage errors."""
    missing = [p for p in raw_paths if not Path(p).exists()]
    if missing:
        print(f"relais send: no such file or directory: {', '.join(missing)}", file=sys.stderr)
        return 2
    paths = list(_files(raw_paths))
    if not paths:
        print("relais send: no *.json files to send", file=sys.stderr)
        return 2
    journal = Journal(Path(journal_path or ".relais-send.journal"))
    print(f"relais send: {len(paths)} file(s) to {url} for target {target} "
          f"({len(journal.accepted)} already accepted per {journal.path})", file=sys.stderr)
    try:
        report = asyncio.run(send(paths, url=url, target=target, token=token, concurrency=concurrency,
                                  journal=journal, progress_out=sys.stderr))
    finally:
        journal.close()
    print(report.render())
    if report_path:
        Path(report_path).write_bytes(orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2))
    if report.interrupted:
        return 130
    return 0 if report.count("rejected") + report.count("failed") == 0 else 1


def _files(raw_paths: Sequence[str]) -> Iterator[Path]:
    seen: set[Path] = set()
    for path in bundle_files(raw_paths):
        if path not in seen:
            seen.add(path)
            yield path
