"""`relais_ingress_requests_total{route,status}`: every HTTP answer of the app, by route template and status.

A pure ASGI middleware (no request buffering): status polls (`/fhir/_transfer/{transfer_id}`) and
submissions (`/fhir`) are different routes, so one cannot hide the other's error rate.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.core.metrics import INGRESS_REQUESTS


class RequestCounter:
    """Counts each HTTP answer once, labelled with the matched route's path template."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: list[int] = []

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            INGRESS_REQUESTS.labels(route, str(status[0]) if status else "none").inc()
