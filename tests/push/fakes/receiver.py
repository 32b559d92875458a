"""A webhook receiver on loopback TLS: checks the signature as a receiver would, with scripted answers."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


@dataclass
class Delivery:
    """One POST as received."""

    path: str
    headers: dict[str, str]
    raw: bytes
    document: dict[str, Any]


@dataclass
class Receiver:
    """Keeps every POST; verifies ``X-Belfry-Signature`` when the path's secret is known."""

    secrets: dict[str, str] = field(default_factory=dict)  # path → signing secret
    received: list[Delivery] = field(default_factory=list)
    bad_signatures: list[str] = field(default_factory=list)
    scripted: dict[str, list[tuple[int, dict[str, str]]]] = field(default_factory=dict)

    async def hook(self, request: Request) -> Response:
        """POST /hooks/{name}."""
        path = request.url.path
        raw = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.received.append(Delivery(path, headers, raw, json.loads(raw)))
        scripted = self.scripted.get(path)
        if scripted:
            status, extra = scripted.pop(0)
            return Response(status_code=status, headers=extra)
        secret = self.secrets.get(path)
        if secret is not None:
            stamp = headers.get("x-belfry-timestamp", "0")
            # Written from the documented scheme, independently of the sender's code.
            expected = "v1=" + hmac.new(secret.encode(), f"v1:{stamp}:".encode() + raw, hashlib.sha256).hexdigest()
            fresh = abs(time.time() - int(stamp)) <= 300
            if not fresh or not hmac.compare_digest(expected, headers.get("x-belfry-signature", "")):
                self.bad_signatures.append(path)
                return Response("bad signature", status_code=401)
        return Response("ok", status_code=200)

    @property
    def app(self) -> Starlette:
        """The ASGI application."""
        return Starlette(routes=[Route("/hooks/{name}", self.hook, methods=["POST"])])
