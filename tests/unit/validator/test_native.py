"""The compiled build of the validator's hot modules (services/validator/native.py) is used only while it
matches the sources: an edited module, or a build for another interpreter, falls back to plain Python."""

from __future__ import annotations

import shutil
from pathlib import Path

from services import validator
from services.validator import compiled_dir, stamp


def _package_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "validator"
    shutil.copytree(validator.HERE, folder, ignore=shutil.ignore_patterns("__pycache__", "_native", "rules"))
    (tmp_path / "core").mkdir()
    shutil.copy2(validator.HERE.parent / "core" / "outcome.py", tmp_path / "core" / "outcome.py")
    return folder


def test_a_build_of_the_current_sources_is_used(tmp_path: Path) -> None:
    folder = _package_copy(tmp_path)
    native = tmp_path / "_native"
    native.mkdir()
    (native / "STAMP").write_text(stamp(folder) + "\n")
    assert compiled_dir(native, folder) == str(native)


def test_an_edited_module_falls_back_to_plain_python(tmp_path: Path) -> None:
    folder = _package_copy(tmp_path)
    native = tmp_path / "_native"
    native.mkdir()
    (native / "STAMP").write_text(stamp(folder) + "\n")
    plan = folder / "plan.py"
    plan.write_text(plan.read_text() + "\n# edited\n")
    assert compiled_dir(native, folder) is None
    (native / "STAMP").write_text(stamp(folder) + "\n")  # rebuilt
    assert compiled_dir(native, folder) == str(native)
    (tmp_path / "core" / "outcome.py").write_text("# another Issue\n")  # what compiled modules import from core
    assert compiled_dir(native, folder) is None


def test_no_build_is_plain_python(tmp_path: Path) -> None:
    assert compiled_dir(tmp_path / "absent", _package_copy(tmp_path)) is None


def test_compiled_modules_are_the_running_ones_when_the_build_is_current() -> None:
    from services.validator import plan

    assert plan.__file__ is not None
    assert plan.__file__.endswith(".so") == validator.COMPILED
