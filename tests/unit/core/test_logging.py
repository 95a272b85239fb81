"""Every log line — ours and third-party libraries' — goes through one chain: JSON, masked."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

# Run in a child interpreter: logging configuration is process-global and pytest owns this one's.
SCRIPT = textwrap.dedent("""
    import logging, uvicorn
    from services.core.logging import configure_logging, get_logger
    from services.core.settings import Settings

    configure_logging(Settings(log_format="json", log_level="info", auth_disabled=True))
    # What uvicorn does when a server is built by the launcher (log_config=None keeps our handler).
    uvicorn.Config(app=None, log_config=None, log_level="warning")
    get_logger("relais.test").info("ours", patient="Jeanne Dupont", contact="jeanne.dupont@example.org")
    logging.getLogger("aiokafka.consumer").warning("coordinator lost for 1 85 05 75 123 456 78")
    logging.getLogger("uvicorn.error").error("client jeanne.dupont@example.org sent garbage")
""")


def test_third_party_lines_are_json_and_masked_like_ours() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True)
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 3, done.stderr
    ours, kafka, uv = lines
    assert ours["event"] == "ours" and ours["patient"] == "[masked]" and ours["contact"] == "[email]"
    assert kafka["level"] == "warning" and kafka["logger"] == "aiokafka.consumer"
    assert "[nir]" in kafka["event"] and "123 456" not in kafka["event"]
    assert uv["level"] == "error" and "[email]" in uv["event"] and "example.org" not in uv["event"]
    assert all("timestamp" in line for line in lines)
