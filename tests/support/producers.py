"""Producer and target files for tests: real YAML, real hashes."""

from __future__ import annotations

import hashlib
from pathlib import Path

TOKEN_A = "token-producer-a"
TOKEN_B = "token-producer-b"


def write_producers(path: Path, *, b_targets: list[str] | None = None) -> Path:
    """Producer 'dui-a' may send anywhere; 'dui-b' only to `b_targets` (default: target 'essms-a')."""
    b = b_targets if b_targets is not None else ["essms-a"]
    path.write_text(
        "producers:\n"
        f"  - id: dui-a\n    token_sha256: {hashlib.sha256(TOKEN_A.encode()).hexdigest()}\n"
        f"  - id: dui-b\n    token_sha256: {hashlib.sha256(TOKEN_B.encode()).hexdigest()}\n"
        f"    targets: [{', '.join(b)}]\n",
        encoding="utf-8",
    )
    return path


def write_targets(path: Path, targets: dict[str, str], *, repair: dict[str, bool] | None = None) -> Path:
    """A targets file with `id: base_url` pairs; `repair` (e.g. {"request_url": False}) applies to each."""
    block = "" if repair is None else "\n    repair: {" + ", ".join(
        f"{k}: {str(v).lower()}" for k, v in repair.items()) + "}"
    lines = ["targets:"] + [f"  - id: {tid}\n    base_url: {url}{block}" for tid, url in targets.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
