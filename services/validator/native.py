"""The validator's hot modules compiled to C by mypyc, used only while they match their sources.

Profiled, a valid Bundle's validation is spread thin over the per-element loops of these modules (the
typed R4 walk, the prescreen, the profile plans and their checks): CPython's cost per element, not any
one rule. Merging walks saves little; compiling the same code with mypyc makes the whole validation
about 1.5x faster (p50, 30 entries), with the same findings (the code is the same, already strictly typed).

`python -m services.validator.native` builds them into `_native/` beside this file (needs mypy, which the
dev dependencies hold, a C compiler and the Python headers; about a minute). The package's `__init__`
uses that folder only while its stamp matches the current sources and interpreter. Without a build,
everything runs as plain Python, with the same findings.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Final

from services.validator import HERE, MODULES, NATIVE, stamp

GROUP: Final = "services.validator.native"  # mypyc's shared library: services/validator/native__mypyc*.so


def build(native: Path = NATIVE) -> Path:
    """Compile MODULES with mypyc into `native` (replaced whole); the stamp is written last."""
    from mypyc.build import mypycify  # build time only: mypy is a dev dependency
    from setuptools import setup

    root = HERE.parents[1]
    with tempfile.TemporaryDirectory(prefix="relais-native-") as scratch:
        work = Path(scratch)
        # A copy of the package tree: the build runs where no pyproject.toml configures setuptools.
        shutil.copytree(root / "services", work / "services",
                        ignore=shutil.ignore_patterns("__pycache__", "_native", "*.so"))
        (work / "mypy.ini").write_text("[mypy]\nignore_missing_imports = True\n")
        cwd = os.getcwd()
        os.chdir(work)
        try:
            setup(name="relais-validator-native", script_args=["-q", "build_ext", "--inplace"],
                  ext_modules=mypycify([f"services/validator/{m}.py" for m in MODULES], group_name=GROUP))
        finally:
            os.chdir(cwd)
        shutil.rmtree(native, ignore_errors=True)
        native.mkdir()
        (native / ".gitignore").write_text("*\n")
        for lib in sorted((work / "services" / "validator").glob("*.so")):
            shutil.copy2(lib, native / lib.name)
    (native / "STAMP").write_text(stamp() + "\n")
    return native


if __name__ == "__main__":
    print(f"compiled {', '.join(MODULES)} into {build()}")
