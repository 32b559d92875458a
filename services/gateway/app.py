"""The Starlette application: the web app's pages and assets, the feed API, the websocket."""

from __future__ import annotations

import json
from collections.abc import Awaitable
from pathlib import Path

from starlette.applications import Starlette
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.gateway import limits
from services.gateway.ws import Endpoint

STATIC = Path(__file__).resolve().parent / "static"

# No inline script or style anywhere: producer text that slipped through
# escaping still cannot run. data: images are the favicon with the red dot.
# connect-src 'self' covers this origin's own websocket (ws/wss on the same
# host and port, CSP Level 3) and nothing else: no exfiltration to other hosts.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; worker-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'self'"
)
_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]


class Front:
    """The outermost ASGI layer: the websocket goes straight to its endpoint, HTTP gets security headers.

    Skipping Starlette's router and middleware for ``/ws`` matters because
    every layer stays suspended for a connection's whole life: each costs
    memory on every idle tab.
    """

    def __init__(self, app: ASGIApp, endpoint: Endpoint) -> None:
        self.app = app
        self.endpoint = endpoint

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """Dispatch by scope type, adding headers on HTTP responses.

        A plain function returning the endpoint's coroutine: no frame of this
        layer stays suspended beside every idle tab.
        """
        if scope["type"] == "websocket" and scope["path"] == "/ws":
            return self.endpoint.handle(scope, receive, send)
        return self._other(scope, receive, send)

    async def _other(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


def _page(name: str) -> Route:
    async def serve(_request: object) -> Response:
        return FileResponse(STATIC / name, media_type="text/html")

    return Route("/" if name == "index.html" else f"/{name.removesuffix('.html')}", serve, methods=["GET"])


# The service worker's list of origins a notification click may open besides the app's own.
_LINK_ORIGINS_SLOT = "const LINK_ORIGINS = [];"


def service_worker_source(link_origins: frozenset[str]) -> bytes:
    """``sw.js`` with the configured link origins filled in (validated origins, JSON-encoded)."""
    source = (STATIC / "sw.js").read_text()
    if _LINK_ORIGINS_SLOT not in source:
        raise RuntimeError("static/sw.js lost its LINK_ORIGINS line")
    return source.replace(_LINK_ORIGINS_SLOT, f"const LINK_ORIGINS = {json.dumps(sorted(link_origins))};").encode()


def create_app(
    endpoint: Endpoint,
    api_routes: list[BaseRoute],
    bounds: limits.Bounds | None = None,
    clients: limits.Buckets | None = None,
    link_origins: frozenset[str] = frozenset(),
) -> ASGIApp:
    """The ASGI app of one gateway replica: limits (``limits.HttpGate``) in front of every HTTP route."""
    worker = service_worker_source(link_origins)

    async def service_worker(_request: object) -> Response:
        # Served from the root so its scope covers the whole app.
        return Response(worker, media_type="text/javascript")

    routes: list[BaseRoute] = [
        _page("index.html"),
        _page("settings.html"),
        _page("admin.html"),
        Route("/sw.js", service_worker, methods=["GET"]),
        *api_routes,
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    bounds = bounds or limits.Bounds()
    clients = clients or limits.Buckets(bounds.client_rate, bounds.client_burst)
    return Front(limits.HttpGate(Starlette(routes=routes), bounds, clients), endpoint)
