"""Wiring of the gateway: the bell sender, the fan-out listener, presence, and the HTTP server."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable

import asyncpg
import uvicorn
from belfry import log, processes
from belfry.auth import TokenIssuer, user_tokens
from belfry.queue.sender import sender_loops
from belfry.service import Built
from starlette.routing import BaseRoute

from services.gateway import api, limits
from services.gateway.app import create_app
from services.gateway.hub import Hub
from services.gateway.origins import OriginPolicy
from services.gateway.sender import BellSender
from services.gateway.settings import Settings
from services.gateway.ws import Endpoint, Limits

_LOG = log.get(__name__)


class GatewayBuild:
    """``build(pool)`` for ``belfry.service.start``; after it ran, ``http_port``, ``hub`` and ``http`` are known."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.http_port = 0
        self.hub: Hub | None = None
        self.http: uvicorn.Server | None = None

    async def __call__(self, pool: asyncpg.Pool) -> Built:
        """Bind the HTTP socket, build the app and the loops."""
        s = self.settings
        # The process's verifier: the identity provider's keys in production, the local keys under belfry up.
        verifier = user_tokens(s.common)
        origins = OriginPolicy(s.allowed_origins)
        hub = Hub(pool, s.sender.worker_id, s.presence_ttl)
        self.hub = hub
        # One per-address bucket for API requests and websocket handshakes alike.
        clients = limits.Buckets(s.bounds.client_rate, s.bounds.client_burst)
        ws_limits = Limits(s.auth_timeout, s.queue_size, s.resume_limit, s.send_timeout, s.bounds)
        endpoint = Endpoint(pool, hub, verifier, origins, ws_limits, clients)
        issuer = (
            TokenIssuer(s.common.token_keys, s.common.token_active_kid, s.common.token_ttl_seconds)
            if s.dev_login
            else None
        )
        guard = api.Guard(verifier, origins, limits.Buckets(s.bounds.user_rate, s.bounds.user_burst))
        routes = api.routes(pool, guard, issuer, (s.demo_account, s.demo_user))
        from services.gateway import proxy  # noqa: PLC0415 - keeps gRPC stubs out of the hot import path

        proxies = proxy.Proxies(s.preferences_target, s.webpush_target, s.dispatcher_target, s.common.tls)
        extra: list[BaseRoute] = [*routes, *proxies.routes(guard)]
        if s.unsubscribe_key is not None:
            # The email sender's List-Unsubscribe links point at the web app's origin.
            from belfry.preferences import Preferences  # noqa: PLC0415 - optional feature
            from belfry.unsubscribe import Signer  # noqa: PLC0415 - optional feature

            from services.gateway import unsubscribe  # noqa: PLC0415 - optional feature

            # Verifies only (the email sender signs): under the current key and the other keys of a rotation.
            signer = Signer(s.unsubscribe_key, ttl_seconds=3600, others=s.unsubscribe_other_keys)
            extra += unsubscribe.routes(signer, Preferences(proxies.preferences))
            # The emails' "open it" links, signed under the same keys: mark read, then redirect.
            from belfry.openlink import OpenSigner  # noqa: PLC0415 - optional feature

            from services.gateway import openlink  # noqa: PLC0415 - optional feature

            extra += openlink.routes(OpenSigner(signer), pool, s.link_origins)
        else:
            _LOG.warning(
                "BELFRY_UNSUBSCRIBE_KEY is not set: one-click unsubscribe and 'open it' links from emails will not work"
            )
        app = create_app(endpoint, extra, s.bounds, clients, s.link_origins)

        # A pod's workers share the port (the kernel spreads connections over them); a lone process
        # does not, so a second one started on a port in use fails instead of taking half its tabs.
        shared = s.common.process_slot is not None
        sock = socket.create_server((s.http_host, s.http_port), family=_family(s.http_host), reuse_port=shared)
        sock.setblocking(False)
        self.http_port = sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            interface="asgi3",  # said, not guessed: Front.__call__ is a plain function returning a coroutine
            # wsproto by default: the least memory per idle tab of uvicorn's implementations (docs/benchmarks.md).
            ws=s.websocket,
            # Compression costs ≈ 37 KiB per tab that accepts it (every browser offers it), for feed frames
            # of ≈ 0.5 KiB sent a few times an hour.
            ws_per_message_deflate=False,
            ws_max_size=64 * 1024,
            http=limits.header_deadline_protocol(s.auth_timeout),  # a silent connection is closed, as is a silent tab
            # X-Forwarded-For is believed only from the configured proxies (the client address keys the limits).
            proxy_headers=bool(s.bounds.trusted_proxies),
            forwarded_allow_ips=list(s.bounds.trusted_proxies),
            # Connections and requests at once (503 beyond): the websocket cap plus room for the HTTP API.
            limit_concurrency=s.bounds.max_sockets + 1024,
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=1,
        )
        http = self.http = uvicorn.Server(config)

        async def serve_http(stop: asyncio.Event) -> None:
            task = asyncio.ensure_future(http.serve(sockets=[sock]))
            await stop.wait()
            hub.close_all()
            for _ in range(50):  # up to ~1 s for the handlers to close their sockets and presence rows
                if not hub.connections:
                    break
                await asyncio.sleep(0.02)
            http.should_exit = True
            await task

        async def close() -> None:
            with contextlib.suppress(OSError):
                sock.close()
            await proxies.close()

        _LOG.info("http listening", port=self.http_port)
        bell = sender_loops(pool, "bell", BellSender(pool).handle, s.sender)
        return Built(background=[serve_http, hub.listen, hub.keep_presence, *bell], cleanup=[close])


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def listeners(settings: Settings) -> list[processes.Listener]:
    """The HTTP port: a pod's worker processes share it as they share the gRPC port (``belfry.processes``)."""
    return [processes.Listener(settings.http_host, settings.http_port, "BELFRY_GATEWAY_HTTP_PORT")]


def build_for(settings: Settings) -> Callable[[asyncpg.Pool], Awaitable[Built]]:
    """The service's ``build(pool)`` for ``belfry.service.start``."""
    return GatewayBuild(settings)
