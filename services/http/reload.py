"""Configuration files of a running HTTP front (producers, operators) re-read when they change, no restart."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from services.core.configfile import file_stamp
from services.core.errors import ConfigurationError
from services.core.logging import get_logger

log = get_logger(__name__)


class FileWatch:
    """A file's modification time, checked on demand: `changed()` is True once per change."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.stamp = file_stamp(path)

    def changed(self) -> bool:
        """True when the file's mtime moved since the last call (or construction)."""
        stamp = file_stamp(self.path)
        if stamp is None or stamp == self.stamp:
            return False
        self.stamp = stamp
        return True


class Watched:
    """One file and what to do when it changed: `reload()` reads it and installs it (raising
    ConfigurationError, with the old content kept, when it became invalid)."""

    def __init__(self, what: str, path: Path | None, reload: Callable[[], None]) -> None:
        self.what = what
        self.watch = FileWatch(path)
        self.reload = reload


class Reloader:
    """Re-reads watched files at most every `every_s` seconds (cheap enough to call on every request)."""

    def __init__(self, files: Sequence[Watched], every_s: float) -> None:
        self.files = [f for f in files if f.watch.path is not None]
        self.every_s = every_s
        self._next = time.monotonic() + every_s

    def maybe(self) -> None:
        """Check the files if RELAIS_AUTH_RELOAD_S passed since the last check."""
        if time.monotonic() >= self._next:
            self._next = time.monotonic() + self.every_s
            self.now()

    def now(self) -> None:
        """Check every file at once; a file that became invalid is logged and the old content kept."""
        for f in self.files:
            if not f.watch.changed():
                continue
            try:
                f.reload()
                log.info(f"{f.what} file reloaded")
            except ConfigurationError as exc:
                log.error(f"{f.what} file changed but is invalid; keeping the previous {f.what}", error=str(exc))

    async def run(self) -> None:
        """Background loop for the app's lifespan (so /ops sees changes even without producer traffic)."""
        while True:
            await asyncio.sleep(self.every_s)
            self.maybe()
