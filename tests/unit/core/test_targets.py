"""The target directory file: good files load; every kind of bad file says what and where."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.core.errors import ConfigurationError
from services.core.targets import TargetDirectory, load_targets

GOOD = """
targets:
  - id: essms-les-tilleuls
    base_url: https://fhir.example/fhir/
    finess: "750000001"
    headers: {X-Tenant: tilleuls}
    bearer_token_env: TILLEULS_TOKEN
  - id: sidoba
    base_url: http://sidoba.local:8080/fhir
    enabled: false
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "targets.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_good_file(tmp_path: Path) -> None:
    directory = load_targets(write(tmp_path, GOOD))
    assert directory.ids() == {"essms-les-tilleuls", "sidoba"}
    tilleuls = directory.get("essms-les-tilleuls")
    assert tilleuls is not None
    assert tilleuls.base_url == "https://fhir.example/fhir"  # trailing slash dropped
    assert tilleuls.finess == "750000001"
    assert tilleuls.headers == {"X-Tenant": "tilleuls"}
    assert tilleuls.bearer_token_env == "TILLEULS_TOKEN"
    assert tilleuls.enabled is True
    sidoba = directory.get("sidoba")
    assert sidoba is not None and sidoba.enabled is False and sidoba.headers == {}
    assert directory.get("unknown") is None


@pytest.mark.parametrize("text", ["", "# nothing\n", "targets: []\n"])
def test_empty_file_means_no_targets(tmp_path: Path, text: str) -> None:
    assert load_targets(write(tmp_path, text)).ids() == set()


def test_no_file_means_an_empty_directory() -> None:
    directory = load_targets(None)
    assert isinstance(directory, TargetDirectory)
    assert directory.targets == [] and directory.ids() == set()


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param("targets:\n  - {id: a, base_url: 'http://x'}\n  - {id: b, base_url: 'http://y'}\n"
                 "  - {id: a, base_url: 'http://z'}\n", "repeated: a", id="duplicate-ids"),
    pytest.param("targets:\n  - {id: a, base_url: 'ftp://x'}\n", "http:// or https://", id="bad-url"),
    pytest.param("targets:\n  - {id: a, base_url: 'fhir.example/fhir'}\n", "targets.0.base_url",
                 id="no-scheme"),
    pytest.param("targets:\n  - {id: a, base_url: 'http://x', token: s3cret}\n", "targets.0.token",
                 id="unknown-key"),
    pytest.param("target:\n  - {id: a, base_url: 'http://x'}\n", "target", id="unknown-top-key"),
    pytest.param("targets:\n  - {id: 'bad id!', base_url: 'http://x'}\n", "targets.0.id", id="bad-id"),
    pytest.param("targets:\n  - {id: a, base_url: 'http://x', finess: '12345'}\n", "targets.0.finess",
                 id="bad-finess"),
    pytest.param("targets:\n  - {base_url: 'http://x'}\n", "targets.0.id", id="missing-id"),
    pytest.param("- a\n- b\n", "invalid", id="list-at-top"),
])
def test_invalid_file_names_the_problem(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigurationError) as info:
        load_targets(path)
    message = str(info.value)
    assert str(path) in message
    assert "invalid" in message
    assert expected in message


def test_yaml_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, "targets: [unclosed\n")
    with pytest.raises(ConfigurationError, match="cannot read targets file"):
        load_targets(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigurationError) as info:
        load_targets(path)
    assert "cannot read targets file" in str(info.value)
    assert str(path) in str(info.value)


def test_configuration_error_is_permanent() -> None:
    assert ConfigurationError.retryable is False
