"""The operator commands' HTTP client: they act on a running broker through its `/ops` API, as kubectl does.

Where: `--url`, else RELAIS_URL, else the local broker (http://127.0.0.1:$RELAIS_HTTP_PORT, 8080 by
default). Who: `--token-file FILE`, else RELAIS_OPS_TOKEN. Every failure is one line on stderr and an
exit code from EXIT (documented in `relais --help` and the README), never a traceback.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import httpx
import orjson

# Exit codes of every operator command (README, "Operators").
EXIT_OK = 0
EXIT_NOT_FOUND = 1  # no such dead letter / transfer / target, or nothing matched
EXIT_USAGE = 2  # bad arguments or an unreadable token file
EXIT_UNREACHABLE = 3  # the broker cannot be reached, or answered 5xx/503
EXIT_REFUSED = 4  # no token, unknown token, a producer token, or a role that may not do this
EXIT_CONFLICT = 5  # the dead letter is not open any more (another replay or discard got there first)

EXIT_CODES_HELP = """\
exit codes:
  0  done            1  not found / nothing matched     2  usage error
  3  broker unreachable or failing (check --url / RELAIS_URL and that `relais run` is up)
  4  refused: no or unknown operator token, or a viewer token for a write (RELAIS_OPS_TOKEN / --token-file)
  5  conflict: the dead letter is not open any more (another replay or discard got there first)
"""


class OpsError(Exception):
    """A failure to report as one line, with its exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def default_url() -> str:
    """RELAIS_URL, else the local broker on RELAIS_HTTP_PORT."""
    if os.environ.get("RELAIS_URL"):
        return os.environ["RELAIS_URL"]
    return f"http://127.0.0.1:{os.environ.get('RELAIS_HTTP_PORT') or 8080}"


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """--url and --token-file, shared by every operator command."""
    parser.add_argument("--url", default=None, help="the broker's base URL (default: $RELAIS_URL, else "
                        "http://127.0.0.1:$RELAIS_HTTP_PORT, port 8080 by default)")
    parser.add_argument("--token-file", default=None, type=Path,
                        help="file holding the operator token (default: $RELAIS_OPS_TOKEN)")


class OpsClient:
    """Synchronous calls to `/ops`; raises OpsError with a one-line message and the right exit code."""

    def __init__(self, url: str, token: str | None, *, timeout_s: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> OpsClient:
        """The client the command line (or environment) names."""
        token = os.environ.get("RELAIS_OPS_TOKEN") or None
        if args.token_file is not None:
            try:
                token = args.token_file.read_text(encoding="utf-8").strip() or None
            except OSError as exc:
                raise OpsError(f"cannot read the token file {args.token_file}: {exc.strerror}", EXIT_USAGE) from exc
        return cls(args.url or default_url(), token)

    def call(self, method: str, path: str, *, params: dict[str, Any] | None = None,
             body: Any = None, raw: bool = False) -> Any:
        """The answer's JSON (or bytes when `raw`) for a 2xx; OpsError otherwise."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        query = {k: v for k, v in (params or {}).items() if v not in (None, "", False)}
        try:
            answer = httpx.request(method, f"{self.url}{path}", params=query, json=body, headers=headers,
                                   timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            raise OpsError(f"cannot reach the Relais broker at {self.url} ({type(exc).__name__}: {exc}); is it "
                           "running? set --url or RELAIS_URL", EXIT_UNREACHABLE) from exc
        if answer.status_code < 300:
            return answer.content if raw else (answer.json() if answer.content else None)
        raise OpsError(self._explain(answer), _exit_code(answer.status_code))

    def _explain(self, answer: httpx.Response) -> str:
        said = _diagnostics(answer)
        if answer.status_code == 401:
            hint = ("no operator token given: set RELAIS_OPS_TOKEN or --token-file" if not self.token
                    else "this operator token is not known to the broker (RELAIS_OPERATORS_FILE / RELAIS_OPS_TOKEN)")
            return f"refused (HTTP 401): {hint}"
        if answer.status_code == 403:
            return f"refused (HTTP 403): {said}"
        if answer.status_code in (502, 503, 504) or answer.status_code >= 500:
            return f"the broker at {self.url} answered HTTP {answer.status_code}: {said}"
        return f"{said} (HTTP {answer.status_code})"


def _diagnostics(answer: httpx.Response) -> str:
    try:
        body = orjson.loads(answer.content)
    except orjson.JSONDecodeError:
        return answer.text.strip().splitlines()[0][:300] if answer.text.strip() else answer.reason_phrase
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        return "; ".join(str(i.get("diagnostics", "")) for i in body.get("issue", []) if isinstance(i, dict))
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])
    return answer.text[:300]


def _exit_code(status: int) -> int:
    if status in (401, 403):
        return EXIT_REFUSED
    if status == 404:
        return EXIT_NOT_FOUND
    if status == 409:
        return EXIT_CONFLICT
    if status >= 500:
        return EXIT_UNREACHABLE
    return EXIT_USAGE
