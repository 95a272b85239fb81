"""`relais send`: post one Bundle or a whole directory to a Relais ingress — bounded, resumable, reported.

When an ESSMS changes DUI software thousands of records move at once. This tool posts them with
bounded concurrency, shows progress (count, rate, ETA) and ends with a report, one line per file.

Each request is keyed on what is actually sent — the ingress URL, the targets and the file's
content — and that key travels as the `Idempotency-Key` header: a resend (after a timeout, a crash,
`kill -9`) answers the transfer the first one created and delivers nothing twice. The journal
(JSON lines, fsync'd) remembers which keys were accepted, so a re-run does not even POST them again;
a file is reported "skipped" only when *its key* was accepted in an earlier run. Identical files
in one folder share a key: they are one transfer, and each file is reported with it.

With `--wait`, each transfer is polled to its final state: delivered, rejected (with the reasons)
or dead-lettered (an operator must act); still in flight at `--wait-timeout`: pending.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import httpx
import orjson

from services.validator.report import bundle_files

RETRYABLE = frozenset({409, 429, 502, 503, 504})  # 409: the same key is still being stored
MAX_TRIES = 5
POLL_MAX_S = 5.0
# Final results, with --wait; without it a file ends accepted, skipped, rejected or failed.
DELIVERED, REJECTED, DEAD_LETTERED, PENDING = "delivered", "rejected", "dead-lettered", "pending"
EXIT_CODES = """\
exit codes:
  0    every file accepted (with --wait: every transfer delivered)
  1    at least one file rejected, failed, dead-lettered or still pending at --wait-timeout
  2    usage error (no such file, nothing to send, bad option)
  130  interrupted (Ctrl-C): run the same command again to continue
"""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one file."""

    path: str
    key: str
    result: str  # accepted | skipped | rejected | failed; with --wait: delivered | rejected | dead-lettered | pending
    status: int | None = None
    transfer_id: str | None = None
    reason: str | None = None
    location: str | None = None


@dataclass
class Report:
    """Counts and the details of every file that did not go well, as printed at the end."""

    outcomes: list[Outcome] = field(default_factory=list)
    waited: bool = False
    interrupted: bool = False
    not_sent: int = 0

    def count(self, result: str) -> int:
        """How many files ended with `result`."""
        return sum(o.result == result for o in self.outcomes)

    @property
    def results(self) -> tuple[str, ...]:
        if self.waited:
            return (DELIVERED, REJECTED, DEAD_LETTERED, PENDING, "failed")
        return ("accepted", "skipped", REJECTED, "failed")

    @property
    def ok(self) -> bool:
        """True when every file reached the state this run promises (accepted; with --wait, delivered)."""
        good = {DELIVERED} if self.waited else {"accepted", "skipped"}
        return all(o.result in good for o in self.outcomes)

    def render(self) -> str:
        """The human-readable summary."""
        label = {"skipped": "skipped (accepted with the same key in an earlier run)"}
        lines = [f"{label.get(r, r)}: {self.count(r)}" for r in self.results]
        if self.interrupted:
            lines.append(f"not sent (interrupted): {self.not_sent} — run the same command again to continue")
        for o in self.outcomes:
            if o.result not in ("accepted", "skipped", DELIVERED):
                lines.append(f"  {o.result} {o.path}: {o.status or '-'} {o.reason or ''}".rstrip())
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """The report as JSON (for --report FILE)."""
        return {**{r: self.count(r) for r in self.results}, "interrupted": self.interrupted,
                "not_sent": self.not_sent, "files": [_as_dict(o) for o in self.outcomes]}


def _as_dict(o: Outcome) -> dict[str, Any]:
    return {k: getattr(o, k) for k in Outcome.__slots__}


def request_key(url: str, targets: str, body: bytes) -> str:
    """The key of one request: where it goes, for whom, and exactly what it carries."""
    named = ",".join(sorted(t.strip() for t in targets.split(",") if t.strip()))
    digest = hashlib.sha256(f"{url.rstrip('/')}\n{named}\n".encode())
    digest.update(hashlib.sha256(body).digest())
    return digest.hexdigest()


class Journal:
    """An append-only JSON-lines file: one line per accepted request key (and its final state), fsync'd."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.earlier: dict[str, dict[str, Any]] = {}  # key -> what an earlier run recorded
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue  # a torn last line from a crash: that file is sent again, with its key
                if isinstance(entry, dict) and isinstance(entry.get("key"), str):
                    self.earlier.setdefault(entry["key"], {}).update(entry)
        self._file: TextIO = path.open("a", encoding="utf-8")

    def record(self, outcome: Outcome, **extra: Any) -> None:
        """Remember an accepted key (or its final state) before moving on."""
        entry = {"key": outcome.key, "path": outcome.path, "transfer_id": outcome.transfer_id,
                 "location": outcome.location, **extra}
        self._file.write(orjson.dumps(entry).decode() + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

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


async def post_one(client: httpx.AsyncClient, url: str, headers: dict[str, str], path: Path, body: bytes,
                   key: str) -> Outcome:
    """POST one file with its Idempotency-Key, retrying what Relais says may succeed later (429, 503, ...)."""
    reason = ""
    keyed = {**headers, "Idempotency-Key": f'"{key}"'}
    for attempt in range(MAX_TRIES):
        try:
            response = await client.post(url, content=body, headers=keyed)
        except httpx.HTTPError as exc:  # a timeout may hide an acceptance: the same key makes the resend safe
            reason = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(min(2 ** attempt, 10))
            continue
        if response.status_code == 202:
            return Outcome(str(path), key, "accepted", 202, response.headers.get("X-Relais-Transfer-Id"),
                           location=response.headers.get("Content-Location"))
        reason = _diagnostics(response)
        if response.status_code not in RETRYABLE:
            return Outcome(str(path), key, REJECTED, response.status_code, reason=reason)
        await asyncio.sleep(_retry_after(response, attempt))
    return Outcome(str(path), key, "failed", reason=f"gave up after {MAX_TRIES} tries: {reason}")


async def wait_final(client: httpx.AsyncClient, headers: dict[str, str], accepted: Outcome,
                     deadline: float) -> Outcome:
    """Poll the transfer's status URL until its final answer (or the deadline: pending)."""
    if not accepted.location:
        return replace(accepted, result="failed", reason="Relais gave no status URL (Content-Location)")
    failures = 0
    while True:
        delay = 1.0
        try:
            response = await client.get(accepted.location, headers=headers)
        except httpx.HTTPError as exc:
            failures += 1
            if failures >= MAX_TRIES * 2:
                return replace(accepted, result="failed", reason=f"status URL unreachable: {exc}")
        else:
            state = response.headers.get("X-Relais-Status", "")
            if response.status_code == 200:
                final = DELIVERED if state == DELIVERED else DEAD_LETTERED
                reason = None if final == DELIVERED else _failures(response)
                return replace(accepted, result=final, status=200, reason=reason)
            if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
                return replace(accepted, result=REJECTED, status=response.status_code, reason=_diagnostics(response))
            delay = _retry_after(response, 0)
        if time.monotonic() + delay > deadline:
            return replace(accepted, result=PENDING, reason="still in flight at --wait-timeout; run again to wait on")
        await asyncio.sleep(min(delay, POLL_MAX_S))


def _failures(response: httpx.Response) -> str:
    """Why a transfer was dead-lettered: each failed target's outcome, from the batch-response."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if body.get("resourceType") == "OperationOutcome":
        return _issues(body)
    parts = []
    for entry in body.get("entry") or []:
        outcome = (entry.get("response") or {}).get("outcome")
        if entry.get("resource") is None and isinstance(outcome, dict):
            parts.append(_issues(outcome))
    return "; ".join(parts)[:500]


def _diagnostics(response: httpx.Response) -> str:
    try:
        return _issues(response.json())
    except (ValueError, AttributeError):
        return response.text[:200]


def _issues(outcome: dict[str, Any]) -> str:
    return "; ".join(f"{i.get('diagnostics', '')} [{', '.join(i.get('expression', []))}]".replace(" []", "")
                     for i in (outcome.get("issue") or [])[:3])


def _retry_after(response: httpx.Response, attempt: int) -> float:
    value = response.headers.get("Retry-After", "")
    return min(float(value), 60.0) if value.isascii() and value.isdigit() else min(2.0 ** attempt, 30.0)


async def send(paths: Sequence[Path], *, url: str, target: str, token: str | None, concurrency: int,
               journal: Journal, progress_out: TextIO, wait: bool = False, wait_timeout_s: float = 900.0) -> Report:
    """Send every file (with its key) not accepted in an earlier run; with `wait`, follow each to its end."""
    headers = {"Content-Type": "application/fhir+json", "X-Relais-Target": target}
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    endpoint = url.rstrip("/") + "/fhir"
    report = Report(waited=wait)
    progress = Progress(len(paths), progress_out)
    queue: asyncio.Queue[Path] = asyncio.Queue()
    for path in paths:
        queue.put_nowait(path)
    deadline = time.monotonic() + wait_timeout_s

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

    async def one(client: httpx.AsyncClient, path: Path) -> Outcome:
        body = await asyncio.to_thread(path.read_bytes)
        key = request_key(url, target, body)
        earlier = journal.earlier.get(key)
        if earlier is not None and earlier.get("transfer_id"):
            outcome = Outcome(str(path), key, "skipped", transfer_id=earlier["transfer_id"],
                              location=earlier.get("location"))
        else:
            outcome = await post_one(client, endpoint, {**headers, **auth}, path, body, key)
            if outcome.result == "accepted":
                journal.record(outcome)
        if not wait or outcome.result not in ("accepted", "skipped"):
            return outcome
        final = earlier.get("final") if earlier else None
        if final in (DELIVERED, REJECTED, DEAD_LETTERED):
            return replace(outcome, result=final, reason=earlier.get("reason") if earlier else None)
        outcome = await wait_final(client, auth, outcome, deadline)
        if outcome.result in (DELIVERED, REJECTED, DEAD_LETTERED):
            journal.record(outcome, final=outcome.result, reason=outcome.reason)
        return outcome

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty() and not stopping.is_set():
            path = queue.get_nowait()
            report.outcomes.append(await one(client, path))
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
         journal_path: str | None, report_path: str | None, wait: bool = False,
         wait_timeout_s: float = 900.0) -> int:
    """`relais send`; its exit codes are EXIT_CODES."""
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
          f"({len(journal.earlier)} request(s) accepted earlier per {journal.path})", file=sys.stderr)
    try:
        report = asyncio.run(send(paths, url=url, target=target, token=token, concurrency=concurrency,
                                  journal=journal, progress_out=sys.stderr, wait=wait, wait_timeout_s=wait_timeout_s))
    finally:
        journal.close()
    print(report.render())
    if report_path:
        Path(report_path).write_bytes(orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2))
    if report.interrupted:
        return 130
    return 0 if report.ok else 1


def _files(raw_paths: Sequence[str]) -> Iterator[Path]:
    seen: set[Path] = set()
    for path in bundle_files(raw_paths):
        if path not in seen:
            seen.add(path)
            yield path
