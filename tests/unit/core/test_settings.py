"""Settings: RELAIS_ environment, defaults, checks that fail fast, topic and group names; the README's
configuration table is the one generated from Settings (docs cannot go stale)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError
from pydantic_settings import SettingsError

from services.core.settings import MiB, Settings
from services.core.settings_doc import readme_block

README = Path(__file__).resolve().parents[3] / "README.md"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No RELAIS_* variable from the developer's shell leaks into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("RELAIS_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_defaults() -> None:
    s = Settings()
    assert (s.http_host, s.http_port) == ("127.0.0.1", 8080)
    assert s.kafka_bootstrap is None
    assert s.topic_prefix == ""
    assert s.retry_delays_s == [10.0, 60.0, 600.0]
    assert s.max_attempts == 8
    assert s.max_body_bytes == 10 * MiB
    assert s.producers_file is None and s.targets_file is None
    assert s.auth_disabled is False


@pytest.mark.parametrize(("env", "value", "field", "expected"), [
    ("RELAIS_HTTP_HOST", "0.0.0.0", "http_host", "0.0.0.0"),
    ("RELAIS_HTTP_PORT", "9090", "http_port", 9090),
    ("RELAIS_KAFKA_BOOTSTRAP", "kafka-1:9092,kafka-2:9092", "kafka_bootstrap", "kafka-1:9092,kafka-2:9092"),
    ("RELAIS_KAFKA_BOOTSTRAP", "  kafka:9092  ", "kafka_bootstrap", "kafka:9092"),
    ("RELAIS_KAFKA_BOOTSTRAP", "", "kafka_bootstrap", None),
    ("RELAIS_KAFKA_BOOTSTRAP", "   ", "kafka_bootstrap", None),
    ("RELAIS_TOPIC_PREFIX", "prod.", "topic_prefix", "prod."),
    ("RELAIS_RETRY_DELAYS_S", "[1, 2.5, 30]", "retry_delays_s", [1.0, 2.5, 30.0]),
    ("RELAIS_MAX_ATTEMPTS", "3", "max_attempts", 3),
    ("RELAIS_AUTH_DISABLED", "true", "auth_disabled", True),
    ("RELAIS_LOG_LEVEL", "debug", "log_level", "debug"),
    ("relais_http_port", "7070", "http_port", 7070),  # environment names are case-insensitive
    ("RELAIS_TLS_REVOKED_FINGERPRINTS", f" {'AB:' * 31}AB , {'0' * 64},", "tls_revoked_fingerprints",
     ["ab" * 32, "0" * 64]),
])
def test_environment_with_relais_prefix(clean_env: pytest.MonkeyPatch, env: str, value: str, field: str,
                                        expected: object) -> None:
    clean_env.setenv(env, value)
    assert getattr(Settings(), field) == expected


def test_unprefixed_variables_are_ignored(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("HTTP_PORT", "1234")
    clean_env.setenv("KAFKA_BOOTSTRAP", "elsewhere:9092")
    s = Settings()
    assert s.http_port == 8080 and s.kafka_bootstrap is None


def test_arguments_win_over_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RELAIS_HTTP_PORT", "9090")
    assert Settings(http_port=8181).http_port == 8181


@pytest.mark.parametrize("name", ["producers_file", "targets_file"])
def test_missing_file_fails_naming_the_variable(clean_env: pytest.MonkeyPatch, tmp_path: Path,
                                                name: str) -> None:
    env = f"RELAIS_{name.upper()}"
    clean_env.setenv(env, str(tmp_path / "nope.yaml"))
    with pytest.raises(ValidationError) as info:
        Settings()
    assert env in str(info.value)
    assert "nope.yaml" in str(info.value)


def test_directory_is_not_a_file(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("RELAIS_PRODUCERS_FILE", str(tmp_path))
    with pytest.raises(ValidationError, match="RELAIS_PRODUCERS_FILE"):
        Settings()


def test_existing_files_are_accepted(tmp_path: Path) -> None:
    f = tmp_path / "producers.yaml"
    f.write_text("producers: []\n")
    s = Settings(producers_file=f, targets_file=f)
    assert s.producers_file == f and s.targets_file == f


@pytest.mark.parametrize(("prefix", "topic", "group"), [
    ("", "transfers.received", "relais-validator"),
    ("prod.", "prod.transfers.received", "prod.relais-validator"),
    ("t-42-", "t-42-transfers.received", "t-42-relais-validator"),
])
def test_topic_and_group_prefixing(prefix: str, topic: str, group: str) -> None:
    s = Settings(topic_prefix=prefix)
    assert s.topic("transfers.received") == topic
    assert s.group("validator") == group


@pytest.mark.parametrize(("value", "ok"), [
    (1023, False), (1024, True), (10 * MiB, True), (30 * MiB, True), (30 * MiB + 1, False), (0, False),
])
def test_max_body_bytes_bounds(value: int, ok: bool) -> None:
    if ok:
        assert Settings(max_body_bytes=value).max_body_bytes == value
    else:
        with pytest.raises(ValidationError, match="max_body_bytes"):
            Settings(max_body_bytes=value)


@pytest.mark.parametrize(("field", "value"), [
    ("http_port", -1), ("http_port", 65536), ("topic_partitions", 0), ("max_attempts", 0),
    ("kafka_timeout_s", 0), ("log_level", "verbose"), ("batch_size", 0),
    ("tls_revoked_fingerprints", ["ab" * 31]),  # a digit short: it would never match, the revocation silently void
])
def test_nonsense_fails_fast(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        Settings(**{field: value})


def test_retry_delays_that_are_not_json_fail(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RELAIS_RETRY_DELAYS_S", "10,60")
    with pytest.raises(SettingsError, match="retry_delays_s"):
        Settings()


@pytest.mark.parametrize("delays", [[], [10.0, -5.0]])
def test_retry_delays_must_be_a_non_empty_list_of_positive_delays(delays: list[float]) -> None:
    # An empty list leaves no retry tier (delivery's decide() then indexes an empty list);
    # a negative delay means nothing. Both are nonsense to refuse at start.
    with pytest.raises(ValidationError, match="retry_delays_s"):
        Settings(retry_delays_s=delays)


def test_readme_configuration_table_is_current() -> None:
    assert readme_block() in README.read_text(encoding="utf-8"), (
        "README configuration table is stale: regenerate it with `python -m services.core.settings_doc`"
    )
