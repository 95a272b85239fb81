"""file_stamp(): what the reloaders (keys, TLS files, producers and operators files) compare to see a change."""

from __future__ import annotations

import os
from pathlib import Path

from services.core.configfile import file_stamp


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
