"""Run an ASGI app on a loopback TLS port inside the test's event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from starlette.types import ASGIApp

from tests.push.fakes.tls import Pki


@asynccontextmanager
async def serve_tls(app: ASGIApp, pki: Pki) -> AsyncIterator[int]:
    """Serve ``app`` over HTTPS on 127.0.0.1; yields the bound port."""
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        ssl_certfile=str(pki.cert_file),
        ssl_keyfile=str(pki.key_file),
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        server.should_exit = True
        await task
