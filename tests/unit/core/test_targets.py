"""The target directory file: good files load; every kind of bad file says what and where."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.core.errors import ConfigurationError, PermanentError, TransientError
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
    assert issubclass(ConfigurationError, PermanentError)
    assert not issubclass(ConfigurationError, TransientError)


FULL = """
targets:
  - id: a
    base_url: https://a.example/fhir
    auth: {type: oauth2, token_url: https://auth.example/token, client_id: relais, client_secret_env: A_SECRET}
    timeouts: {connect_s: 2, total_s: 10}
    max_concurrency: 2
    retry: {delays_s: [1, 5], max_attempts: 3, max_age_s: 3600, jitter: 0}
    breaker: {failures: 3, probe_every_s: 10}
    ambiguous: dead-letter
    paused: true
  - id: b
    base_url: http://b.example/fhir
    auth: {type: bearer, token_env: B_TOKEN}
routes:
  - id: r1
    when: {profiles: [tddui-encounter-sejour]}
    add: [b]
"""


def test_full_file(tmp_path: Path) -> None:
    d = load_targets(write(tmp_path, FULL))
    a = d.get("a")
    assert a is not None and a.auth.type == "oauth2" and a.timeouts.total_s == 10 and a.max_concurrency == 2
    assert a.retry.delays_s == (1, 5) and a.retry.max_attempts == 3 and a.ambiguous == "dead-letter" and a.paused
    b = d.get("b")
    assert b is not None and b.ambiguous == "probe" and b.retry.max_attempts is None  # defaults
    assert d.routes[0].add == ("b",)


def test_bearer_shorthand_is_expanded(tmp_path: Path) -> None:
    d = load_targets(write(tmp_path, GOOD))
    auth = d.get("essms-les-tilleuls").effective_auth  # type: ignore[union-attr]
    assert auth.type == "bearer" and auth.token_env == "TILLEULS_TOKEN"  # type: ignore[union-attr]


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param("targets:\n  - {id: a, base_url: 'http://x', auth: {type: kerberos}}\n", "targets.0.auth",
                 id="unknown-auth"),
    pytest.param("targets:\n  - {id: a, base_url: 'http://x', auth: {type: oauth2, client_id: c}}\n",
                 "token_url", id="oauth2-incomplete"),
    pytest.param("targets:\n  - {id: a, base_url: 'http://x', tls: {client_cert: /nope.pem, client_key: /nope.key}}\n",
                 "does not exist", id="missing-cert"),
    pytest.param("targets:\n  - {id: a, base_url: 'http://x', tls: {client_cert: /nope.pem}}\n",
                 "both client_cert and client_key", id="cert-without-key"),
    pytest.param("targets:\n  - {id: a, base_url: 'http://x', ambiguous: maybe}\n", "targets.0.ambiguous",
                 id="bad-ambiguous-policy"),
    pytest.param("targets:\n  - {id: a, base_url: 'http://x', retry: {delays_s: [0]}}\n", "> 0", id="zero-delay"),
    pytest.param("targets:\n  - {id: a, base_url: 'http://x'}\nroutes:\n  - {id: r, add: [ghost]}\n",
                 "unknown target(s): ghost", id="route-to-unknown-target"),
    pytest.param("targets:\n  - {id: a, base_url: 'http://x', bearer_token_env: T, auth: {type: bearer, "
                 "token_env: U}}\n", "either bearer_token_env or auth", id="two-auths"),
])
def test_invalid_delivery_settings_name_the_problem(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        load_targets(write(tmp_path, text))
    assert expected in str(info.value)
