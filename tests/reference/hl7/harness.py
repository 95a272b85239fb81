"""The HL7 FHIR validator as a reference for base FHIR R4, offline, driven from Python.

`ensure_built()` resolves the engine's jars from Maven Central (pom.xml beside this file), compiles
`java/RelaisReference.java` and writes the R4 4.0.1 package cache, all under `.cache/hl7-validator/`
(or `$RELAIS_HL7_CACHE`), once; later calls find it there. `validate_all()` starts the engine once and
validates a whole corpus of Bundles in one JVM run (the engine costs 5-15 s to start, then
milliseconds a Bundle), returning each Bundle's messages.

Needs Java 17+ and Maven (`apt-get install -y openjdk-17-jdk-headless maven`). Not part of Relais:
tests and benchmarks only.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import orjson

from devtools import maven

HERE = Path(__file__).resolve().parent
CACHE_ENV = "RELAIS_HL7_CACHE"
INSTALL_HINT = "install Java 17 (with javac) and Maven: apt-get install -y openjdk-17-jdk-headless maven"
_BUILD_TIMEOUT_S = 600.0
_MARKER = "complete"


class ReferenceUnavailable(RuntimeError):
    """Java, javac or Maven is missing, or Maven Central could not be reached: say what to install."""


@dataclass(frozen=True, slots=True)
class Message:
    level: str  # fatal | error | warning | information
    id: str | None  # the engine's message id (I18nConstants), stable across wordings
    location: str  # FHIRPath, normalised to Relais's spelling (see `normalise`)
    text: str


@dataclass(frozen=True, slots=True)
class Result:
    ms: float  # time the engine spent on this Bundle
    messages: tuple[Message, ...]

    @property
    def errors(self) -> tuple[Message, ...]:
        return tuple(m for m in self.messages if m.level in ("error", "fatal"))


def cache_dir() -> Path:
    return maven.cache_root(CACHE_ENV) / "hl7-validator"


def _tool(name: str) -> str:
    try:
        return maven.tool(name, INSTALL_HINT)
    except maven.ToolMissing as exc:
        raise ReferenceUnavailable(str(exc)) from None


def _run(cmd: list[str], what: str) -> None:
    try:
        maven.run(cmd, what, _BUILD_TIMEOUT_S)
    except maven.MavenFailed as exc:
        raise ReferenceUnavailable(str(exc)) from exc


def ensure_built() -> Path:
    """The cache folder, with jars, compiled harness and package cache; built on first use."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    sources = (HERE / "pom.xml").read_bytes() + (HERE / "java" / "RelaisReference.java").read_bytes()
    stamp = hashlib.sha256(sources).hexdigest()  # a change to the pom or the main rebuilds the cache
    with maven.locked(root / ".lock"):
        marker = root / _MARKER
        if marker.is_file() and marker.read_text() == stamp:
            return root
        marker.unlink(missing_ok=True)
        java, javac, mvn = _tool("java"), _tool("javac"), _tool("mvn")
        _run([mvn, "-q", "-B", "-f", str(HERE / "pom.xml"), "dependency:build-classpath",
              f"-Dmdep.outputFile={root / 'classpath.txt'}"], "Maven (resolving the HL7 validator's jars)")
        classes = root / "classes"
        shutil.rmtree(classes, ignore_errors=True)
        classes.mkdir()
        cp = (root / "classpath.txt").read_text().strip()
        _run([javac, "-nowarn", "-d", str(classes), "-cp", cp, str(HERE / "java" / "RelaisReference.java")],
             "javac (compiling the harness)")
        packages = root / "home" / ".fhir" / "packages"
        shutil.rmtree(packages, ignore_errors=True)
        _run([java, "-Xmx1g", "-cp", f"{cp}:{classes}", "RelaisReference", "package", str(packages)],
             "the R4 package build")
        marker.write_text(stamp)
    return root


def validate_all(bundles: Mapping[str, bytes], warm_rounds: int = 0, timeout_s: float = 300.0,
                 quick_start: bool = True) -> dict[str, Result]:
    """Every Bundle (name → JSON bytes) validated by the HL7 engine in one JVM run.

    `quick_start` (tests) compiles with C1 only, which starts the engine and gets through a one-pass
    corpus about a third faster; the benchmark turns it off to time the engine fully warmed up.
    """
    root = ensure_built()
    cp = f"{(root / 'classpath.txt').read_text().strip()}:{root / 'classes'}"
    (root / "tmp").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="relais-hl7-") as scratch:
        corpus = Path(scratch) / "in"
        corpus.mkdir()
        names = {}
        for k, (name, raw) in enumerate(sorted(bundles.items())):
            file = f"{k:05d}.json"
            names[file] = name
            (corpus / file).write_bytes(raw)
        out = Path(scratch) / "out.jsonl"
        cmd = [_tool("java"), "-Xmx1g", "-XX:+UseSerialGC", *(["-XX:TieredStopAtLevel=1"] if quick_start else []),
               f"-Duser.home={root / 'home'}",
               f"-Djava.io.tmpdir={root / 'tmp'}", "-cp", cp, "RelaisReference", "validate", str(corpus), str(out),
               str(warm_rounds)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
        if done.returncode != 0 or not out.is_file():
            raise ReferenceUnavailable(f"the HL7 validator run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        results: dict[str, Result] = {}
        for line in out.read_bytes().splitlines():
            row = orjson.loads(line)
            messages = tuple(Message(m["level"], m["id"], normalise(m["location"] or ""), m["text"] or "")
                             for m in row["messages"])
            results[names[row["file"]]] = Result(row["ms"], messages)
    return results


_TYPE_NOTE = re.compile(r"/\*[^*]*\*/")
_URL_FILTER = re.compile(r"\[url='[^']*'\]")


def normalise(location: str) -> str:
    """The engine's location in Relais's FHIRPath spelling.

    `Bundle.entry[6].resource/*DocumentReference/null*/.content[0]` → `Bundle.entry[6].resource.content[0]`;
    `.extension[0][url='…']` → `.extension[0]`.
    """
    return _URL_FILTER.sub("", _TYPE_NOTE.sub("", location))
