"""The wheel carries the product only: `services`, never the development tools (devtools/) nor the tests."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from services import cli

ROOT = Path(__file__).resolve().parents[2]


def test_built_wheel_holds_services_and_no_development_tool(tmp_path: Path) -> None:
    # A copy of what the build reads, with devtools/ beside it as in the repository: the build must leave it out.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("services", "devtools"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", str(src), "-w",
                            str(tmp_path / "dist")], capture_output=True, text=True, timeout=240, check=False)
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = (tmp_path / "dist").glob("relais-*.whl")
    names = zipfile.ZipFile(wheel).namelist()

    assert "services/app.py" in names and "services/ops/templates/overview.html" in names
    rules = {f"services/validator/rules/{p.name}" for p in (ROOT / "services/validator/rules").glob("*.yaml")}
    assert rules - set(names) == set(), "the validator's rule files must ship (a data directory, no package)"
    tools = [n for n in names if "devkafka" in n or "demotarget" in n or n.startswith(("devtools/", "tests/"))]
    assert tools == []
    assert {n.split("/")[0] for n in names} == {"services", wheel.name.split("-py3")[0] + ".dist-info"}


@pytest.mark.parametrize("argv", [["dev-kafka"], ["demo-target"], ["run", "--demo-target"]])
def test_without_the_development_tools_the_cli_says_how_to_get_them(argv: list[str], monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "has_devtools", lambda: False)  # as in an installed wheel: no devtools package
    monkeypatch.setenv("RELAIS_AUTH_DISABLED", "true")
    assert cli.main(argv) == 2
    assert "install Relais from its repository" in capsys.readouterr().err


def test_from_the_repository_the_development_tools_are_there() -> None:
    assert cli.has_devtools()
