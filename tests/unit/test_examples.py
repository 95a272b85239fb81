"""The README sends examples/*.json: they must pass the validator, or the first thing a user tries fails."""

from pathlib import Path

import pytest

from services.validator.logic import validate_bundle

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.json"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_bundles_have_no_errors(path: Path) -> None:
    errors = [i for i in validate_bundle(path.read_bytes()) if i.is_error]
    assert not errors, [(i.expression, i.diagnostics) for i in errors]


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 2
