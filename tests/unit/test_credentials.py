"""The credentials files of both HTTP fronts: the producer directory (ingress) and the operators file (ops, with
roles, RELAIS_OPS_TOKEN and RELAIS_AUTH_DISABLED) — YAML loading, token authentication by SHA-256, bad files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from services.core.errors import ConfigurationError
from services.core.settings import Settings
from services.ingress.producers import ANONYMOUS, load_producers
from services.ops.auth import ANONYMOUS as ANONYMOUS_OPERATOR
from services.ops.auth import load_operators


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


GOOD = f"""
producers:
  - id: dui-acme-ssiad-paris
    token_sha256: {sha("acme-secret")}
    targets: [sidoba, essms-a]
  - id: dui-other
    token_sha256: {sha("other-secret").upper()}
"""


def write(path: Path, body: str) -> Path:
    path.write_text(body, encoding="utf-8")
    return path


@pytest.fixture
def directory(tmp_path: Path):  # type: ignore[no-untyped-def]
    return load_producers(write(tmp_path / "producers.yaml", GOOD))


@pytest.mark.parametrize(("token", "producer_id"), [
    ("acme-secret", "dui-acme-ssiad-paris"),
    ("other-secret", "dui-other"),      # an upper-case hash in the file still matches
    ("wrong", None),
    ("", None),
    ("acme-secret ", None),
    ("ACME-SECRET", None),
    (sha("acme-secret"), None),         # the hash itself is not the token
])
def test_authenticate(directory, token: str, producer_id: str | None) -> None:  # type: ignore[no-untyped-def]
    found = directory.authenticate(token)
    assert (found.id if found else None) == producer_id


def test_loaded_fields(directory) -> None:  # type: ignore[no-untyped-def]
    acme, other = directory.producers
    assert acme.targets == frozenset({"sidoba", "essms-a"})
    assert acme.may_send_to("sidoba") and not acme.may_send_to("essms-b")
    assert other.targets is None and other.may_send_to("anything")
    assert other.token_sha256 == sha("other-secret")  # normalised to lower case


@pytest.mark.parametrize("text", ["", "producers: []\n"])
def test_empty_file_authenticates_nobody(tmp_path: Path, text: str) -> None:
    assert load_producers(write(tmp_path / "producers.yaml", text)).authenticate("anything") is None


@pytest.mark.parametrize(("token_sha256", "why"), [
    ("abc123", "too-short"),
    ("z" * 64, "not-hex"),
    ("0" * 65, "too-long"),
    ("'" + "ab" * 31 + "  '", "spaces"),
])
def test_bad_hash_format(tmp_path: Path, token_sha256: str, why: str) -> None:
    path = write(tmp_path / "producers.yaml", f"producers:\n  - id: dui-x\n    token_sha256: {token_sha256}\n")
    with pytest.raises(ConfigurationError) as info:
        load_producers(path)
    assert str(path) in str(info.value)
    assert "producers.0.token_sha256" in str(info.value)


@pytest.mark.parametrize(("text", "expected"), [
    (f"producers:\n  - {{id: dui-x, token_sha256: {sha('t')}, secret: t}}\n", "producers.0.secret"),
    (f"producers:\n  - {{id: 'bad id', token_sha256: {sha('t')}}}\n", "producers.0.id"),
    ("producers:\n  - {id: dui-x}\n", "producers.0.token_sha256"),
    ("producers: [unclosed\n", "cannot read producers file"),
])
def test_invalid_file(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigurationError, match=expected):
        load_producers(write(tmp_path / "producers.yaml", text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read producers file"):
        load_producers(tmp_path / "absent.yaml")


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param(f"producers:\n  - {{id: dui-a, token_sha256: {sha('t1')}}}\n"
                 f"  - {{id: dui-a, token_sha256: {sha('t2')}}}\n", "dui-a", id="duplicate-id"),
    pytest.param(f"producers:\n  - {{id: dui-a, token_sha256: {sha('same')}}}\n"
                 f"  - {{id: dui-b, token_sha256: {sha('same')}}}\n", "token_sha256", id="shared-token"),
])
def test_ambiguous_producers_are_refused(tmp_path: Path, text: str, expected: str) -> None:
    # One token that authenticates as two producers (or two entries with one id) makes the audit
    # trail lie; the targets file refuses repeated ids, so should this one.
    with pytest.raises(ConfigurationError, match=expected):
        load_producers(write(tmp_path / "producers.yaml", text))


def test_anonymous_producer_matches_no_token() -> None:
    assert ANONYMOUS.id == "anonymous" and ANONYMOUS.targets is None
    assert sha("") != ANONYMOUS.token_sha256


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
    assert load_operators(Settings(auth_disabled=True)).authenticate(None) is ANONYMOUS_OPERATOR
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
