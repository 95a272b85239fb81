"""Operator tokens and roles, separate from producers."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from services.core.errors import ConfigurationError
from services.core.settings import Settings
from services.ops.auth import ANONYMOUS, load_operators


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def write(path: Path, body: str) -> Path:
    path.write_text(body, encoding="utf-8")
    return path


def test_operators_file_gives_roles(tmp_path: Path) -> None:
    f = write(tmp_path / "ops.yaml", f"operators:\n  - {{id: alice, token_sha256: {sha('a')}, role: operator}}\n"
                                     f"  - {{id: bob, token_sha256: {sha('b')}}}\n")
    directory = load_operators(Settings(operators_file=f))
    alice, bob = directory.authenticate("a"), directory.authenticate("b")
    assert alice is not None and alice.may("operator")
    assert bob is not None and bob.role == "viewer" and not bob.may("operator") and bob.may("viewer")
    assert directory.authenticate("c") is None and directory.authenticate(None) is None


def test_ops_token_is_an_operator_and_auth_disabled_opens_only_without_operators(tmp_path: Path) -> None:
    assert load_operators(Settings(ops_token="t")).authenticate("t").id == "ops-token"  # type: ignore[union-attr]
    assert load_operators(Settings(auth_disabled=True)).authenticate(None) is ANONYMOUS
    assert load_operators(Settings(auth_disabled=True, ops_token="t")).authenticate(None) is None
    assert load_operators(Settings()).authenticate(None) is None


@pytest.mark.parametrize("body", [
    "operators:\n  - {id: x, token_sha256: nothex}\n",
    f"operators:\n  - {{id: x, token_sha256: {sha('a')}, role: admin}}\n",
    f"operators:\n  - {{id: x, token_sha256: {sha('a')}}}\n  - {{id: x, token_sha256: {sha('b')}}}\n",
    f"operators:\n  - {{id: x, token_sha256: {sha('a')}}}\n  - {{id: y, token_sha256: {sha('a')}}}\n",
])
def test_bad_operators_files_are_refused(tmp_path: Path, body: str) -> None:
    with pytest.raises(ConfigurationError, match="operators file"):
        load_operators(Settings(operators_file=write(tmp_path / "ops.yaml", body)))
