"""file_stamp(): what the reloaders (keys, TLS files, producers and operators files) compare to see a change;
sha256_fingerprint(): a certificate fingerprint as configured, in the one form it is compared in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.core.configfile import file_stamp, sha256_fingerprint


def test_a_file_stamp_moves_when_the_file_is_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    path.write_text("one")
    os.utime(path, ns=(1_000_000_000_000_000_001, 1_000_000_000_000_000_001))
    first = file_stamp(path)
    assert first == 1_000_000_000_000_000_001  # nanoseconds: two writes within one float's precision differ
    path.write_text("two")
    os.utime(path, ns=(1_000_000_000_000_000_002, 1_000_000_000_000_000_002))
    assert file_stamp(path) != first


def test_no_file_has_no_stamp(tmp_path: Path) -> None:
    assert file_stamp(tmp_path / "absent.yaml") is None
    assert file_stamp(None) is None


@pytest.mark.parametrize(("written", "compared"), [
    ("ab" * 32, "ab" * 32),
    (" " + ":".join(["AB"] * 32) + " ", "ab" * 32),  # as openssl x509 -fingerprint -sha256 prints it
])
def test_a_fingerprint_is_compared_in_one_form(written: str, compared: str) -> None:
    assert sha256_fingerprint(written) == compared


@pytest.mark.parametrize("written", ["ab" * 31, "ab" * 33, "zz" * 32, "", "sha256:" + "ab" * 32])
def test_a_fingerprint_that_could_never_match_is_refused(written: str) -> None:
    with pytest.raises(ValueError, match="64 hex digits"):
        sha256_fingerprint(written)
