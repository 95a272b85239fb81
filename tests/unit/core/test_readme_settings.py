"""The README's configuration table is the one generated from Settings: docs cannot go stale."""

from pathlib import Path

from services.core.settings_doc import readme_block

README = Path(__file__).resolve().parents[3] / "README.md"


def test_readme_configuration_table_is_current() -> None:
    assert readme_block() in README.read_text(encoding="utf-8"), (
        "README configuration table is stale: regenerate it with `python -m services.core.settings_doc`"
    )
