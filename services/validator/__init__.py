"""The TDDUI validator. Its hot modules run compiled by mypyc when a build of their current sources exists.

`python -m services.validator.native` builds them into `_native/` (see native.py). This package puts that
folder first on its path only when its stamp matches the compiled modules' sources and this interpreter,
so an edited module (or another Python) falls back to the pure-Python code, never to stale code.
"""

import hashlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
NATIVE = HERE / "_native"
# The modules whose loops run on every element of every Bundle (py-spy: about 90% of a valid Bundle's time).
MODULES = ("plan", "checks", "r4", "prescreen", "paths", "jsonwalk", "terminology", "engine", "bundle", "base", "logic",
           "invariants", "messages", "compiler")


def stamp(folder: Path = HERE) -> str:
    """What a build is valid for: this interpreter, and the sources of the package and of what the compiled
    modules import from outside it (mypyc checks their types and may inline their constants)."""
    digest = hashlib.sha256(sys.version.encode())
    for source in [*sorted(folder.glob("*.py")), folder.parents[0] / "core" / "outcome.py"]:
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()


def compiled_dir(native: Path = NATIVE, folder: Path = HERE) -> str | None:
    """The build folder when it holds a build of the current sources for this interpreter, else None."""
    try:
        built = (native / "STAMP").read_text().strip()
    except OSError:
        return None
    return str(native) if built == stamp(folder) else None


_compiled = compiled_dir()
if _compiled is not None:
    __path__.insert(0, _compiled)  # extension modules found there first; the other modules from the sources
COMPILED = _compiled is not None
