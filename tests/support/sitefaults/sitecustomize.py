"""A validator bug on demand, in every Relais process started with this folder on PYTHONPATH.

When RELAIS_TEST_VALIDATOR_FAULT_FILE names an existing file, the validator stage raises on every
Bundle whose JSON contains the file's text — the record is then poison (a stage's dead letter).
Deleting the file is "fixing the cause": a replay then goes through the real validator.
"""

from __future__ import annotations

import os

_FAULT_FILE = os.environ.get("RELAIS_TEST_VALIDATOR_FAULT_FILE")

if _FAULT_FILE:
    from pathlib import Path
    from typing import Any

    import orjson

    import services.validator.stage as _stage

    _real = _stage.validate_bundle

    def _faulty(bundle: Any, options: Any) -> Any:
        marker = Path(_FAULT_FILE)  # type: ignore[arg-type]
        if marker.exists():
            text = marker.read_text(encoding="utf-8").strip()
            raw = bundle if isinstance(bundle, bytes) else orjson.dumps(bundle)
            if text and text.encode() in raw:
                raise RuntimeError("simulated validator bug (the test's fault file is present)")
        return _real(bundle, options)

    _stage.validate_bundle = _faulty
