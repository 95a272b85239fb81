"""Run the demo FHIR target: `python -m devtools.demotarget [--host H] [--port P]`."""

from __future__ import annotations

import argparse
import asyncio
import socket
import ssl
import sys
from typing import Any

import uvicorn
from fastapi import FastAPI

from devtools.demotarget.app import DropCapableH11Protocol, OAuthServer, create_app


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: the OS picks a free one)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        # Listen now, so clients that read the "listening" line can connect before uvicorn accepts.
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def make_server(app: FastAPI, tls: dict[str, Any] | None = None) -> uvicorn.Server:
    """A quiet uvicorn server for the app, able to honour "drop" faults; `tls`: uvicorn's ssl_* options."""
    config = uvicorn.Config(
        app,
        **(tls or {}),
        http=DropCapableH11Protocol,
        lifespan="off",
        log_level="warning",
        access_log=False,
        # The drop fault finds its connection by the client address: it must be the real one.
        proxy_headers=False,
    )
    return uvicorn.Server(config)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relais demo-target",
        description=(
            "Demo FHIR R4 target (plays the target ESSMS): accepts transaction Bundles on POST /fhir, "
            "answers transaction-response Bundles, records what it receives (GET/DELETE /_received) "
            "and fails on demand (POST/DELETE /_faults). In-memory only; for demos and tests."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    parser.add_argument(
        "--port", type=int, default=8090, help="TCP port; 0 picks a free one (default: %(default)s)"
    )
    parser.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--tls-key", help="private key of --tls-cert (PEM)")
    parser.add_argument("--tls-client-ca", help="require client certificates signed by this CA (mutual TLS)")
    parser.add_argument("--oauth-client", metavar="ID:SECRET",
                        help="require OAuth2 bearer tokens, issued at POST /oauth/token to this client")
    parser.add_argument("--no-search", action="store_true",
                        help="refuse every search (400), as a server without search support does")
    parser.add_argument("--token-ttl", type=int, default=3600, help="lifetime of issued tokens, seconds")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Serve the demo target until interrupted; returns the process exit code."""
    args = _parser().parse_args(argv)
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        print(f"demo FHIR target: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    with sock:
        port = sock.getsockname()[1]
        host = f"[{args.host}]" if ":" in args.host else args.host
        tls: dict[str, Any] | None = None
        if args.tls_cert:
            tls = {"ssl_certfile": args.tls_cert, "ssl_keyfile": args.tls_key}
            if args.tls_client_ca:
                tls |= {"ssl_ca_certs": args.tls_client_ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
        oauth = None
        if args.oauth_client:
            client_id, _, secret = args.oauth_client.partition(":")
            oauth = OAuthServer(client_id, secret, args.token_ttl)
        scheme = "https" if tls else "http"
        print(f"demo FHIR target listening on {scheme}://{host}:{port}/fhir", file=sys.stderr, flush=True)
        server = make_server(create_app(oauth=oauth, search=not args.no_search), tls)
        try:
            asyncio.run(server.serve(sockets=[sock]))
        except KeyboardInterrupt:
            # uvicorn shuts down gracefully, then re-raises Ctrl-C: exit quietly, as shells expect.
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
