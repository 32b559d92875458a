"""The web push sender's HTTP client: one aiohttp session, pinned to the guard's addresses.

Every push first goes through ``ssrf.Guard.check``, which resolves the
endpoint's name once and approves (or refuses) every address it got.
``PinnedResolver`` is the session's only resolver: it answers a name with the
address the guard last approved for it and never asks DNS, so a name that
rebinds after the check cannot steer a connection anywhere the guard did not
approve. The URL keeps the name, so TLS SNI, certificate verification and the
Host header all carry it. No redirects, no environment proxies.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import aiohttp
import aiohttp.abc
from belfry import ssrf

# Push hosts are an allow-list, so this is never reached in practice; the bound stops a
# wide suffix entry (".notify.windows.com") from growing the table without limit.
_MAX_PINS = 10_000


class NotPinned(OSError):
    """A connection was asked for a name the guard has not approved (never resolved here)."""


class PinnedResolver(aiohttp.abc.AbstractResolver):
    """Answers only with addresses ``pin`` was given; never a DNS lookup."""

    def __init__(self) -> None:
        self._pins: dict[str, str] = {}

    def pin(self, target: ssrf.Target) -> None:
        """Record the address the guard approved for ``target.host`` (the latest approval wins)."""
        if len(self._pins) >= _MAX_PINS and target.host not in self._pins:
            self._pins.clear()
        self._pins[target.host] = target.address

    def pinned(self, host: str) -> str | None:
        """The address a new connection to ``host`` would use, if any."""
        return self._pins.get(host)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp.abc.ResolveResult]:
        """The pinned address of ``host``; a name without one is refused, not looked up."""
        address = self._pins.get(host)
        if address is None:
            raise NotPinned(f"{host} has no address approved by the outbound-request guard")
        found = socket.AF_INET6 if ":" in address else socket.AF_INET
        return [
            aiohttp.abc.ResolveResult(
                hostname=host, host=address, port=port, family=found, proto=0, flags=socket.AI_NUMERICHOST
            )
        ]

    async def close(self) -> None:
        """Nothing to release."""


def session(
    resolver: PinnedResolver,
    *,
    ca_file: Path | None = None,
    timeout: float = 10.0,
    max_connections: int = 200,
    keepalive: float = 30.0,
) -> aiohttp.ClientSession:
    """The sender process's one session (create it inside the running event loop).

    TLS is verified against ``ca_file`` (tests, a private relay) or the system
    store. aiohttp's own DNS cache is off so every new connection asks the
    resolver for the current pin. ``trust_env=False``: no proxy from the
    environment may carry a push elsewhere.
    """
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    connector = aiohttp.TCPConnector(
        resolver=resolver,
        use_dns_cache=False,
        ssl=context,
        limit=max_connections,
        keepalive_timeout=keepalive,
    )
    return aiohttp.ClientSession(
        connector=connector,
        trust_env=False,
        timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, 5.0)),
        # Push services answer 201 with an empty body; a redirect is refused, never followed.
        auto_decompress=False,
    )
