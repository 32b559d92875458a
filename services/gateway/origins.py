"""Which page origins may open a websocket or send a state-changing request."""

from __future__ import annotations

from urllib.parse import urlsplit


class OriginPolicy:
    """The page's own origin (same host) plus an explicit allow-list."""

    def __init__(self, allowed: frozenset[str]) -> None:
        self.allowed = allowed

    def allows(self, origin: str | None, host: str | None) -> bool:
        """Whether a request from ``origin`` to ``host`` may proceed (no Origin: not a browser, allowed)."""
        if origin is None:
            return True
        if origin in self.allowed:
            return True
        parts = urlsplit(origin)
        return bool(host) and parts.netloc == host and parts.scheme in {"http", "https"}
