"""Java tools and Maven Central jars for the development tools and the reference tests: one way to find
`java`/`javac`/`mvn`, to cache what Maven fetched under `./.cache`, to serialise fetches and to run Maven.

Used by devtools.devkafka (a Kafka broker's jars) and tests/reference/hl7/harness.py (the HL7 validator's).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

TAIL_LINES = 40


class ToolMissing(RuntimeError):
    """`java`, `javac` or `mvn` is not installed (the message says which)."""


class MavenFailed(RuntimeError):
    """Maven (or a Java tool run for the build) failed or timed out; the message carries its last lines."""


def cache_root(env: str) -> Path:
    """`$<env>` when set, else `./.cache` under the current directory (resolved)."""
    value = os.environ.get(env, "").strip()
    return (Path(value).expanduser() if value else Path.cwd() / ".cache").resolve()


def tool(name: str, hint: str) -> str:
    """The `java`/`javac` of `$JAVA_HOME` when set, else `name` on PATH; ToolMissing (with `hint`) otherwise."""
    home = os.environ.get("JAVA_HOME", "").strip()
    if name != "mvn" and home and (Path(home) / "bin" / name).is_file():
        return str(Path(home) / "bin" / name)
    found = shutil.which(name)
    if found is None:
        raise ToolMissing(f"{name} is not on PATH; {hint}")
    return found


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created if missing): one fetch at a time per cache, across processes."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run(cmd: Sequence[str], what: str, timeout_s: float, cwd: Path | None = None) -> None:
    """Run a build step (Maven, javac, ...); MavenFailed, saying what failed and how it ended, otherwise."""
    try:
        done = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise MavenFailed(f"{what} did not finish within {timeout_s:.0f} s; check access to Maven Central "
                          "(or a mirror in ~/.m2/settings.xml) and run again") from exc
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-TAIL_LINES:])
        raise MavenFailed(f"{what} failed (exit {done.returncode}); check access to Maven Central and run "
                          f"again. It said:\n{tail}")
