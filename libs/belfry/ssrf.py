"""The outbound-request guard every sender that calls a user-supplied URL uses.

A URL a user (or a browser) hands us is checked once when it is registered
and again before every send, because DNS answers change. ``check`` parses
strictly (``https`` only, no userinfo, no odd IP spellings, an allowed port
and, when configured, an allowed host), resolves the name **once**, and
refuses private, loopback, link-local and other non-global addresses unless
an operator listed the network explicitly. An IPv6 address that carries an
IPv4 address (mapped, SIIT, compatible, NAT64, 6to4, Teredo) is judged by
the IPv4 address it carries (``embedded_ipv4``). ``send`` then connects to exactly
that address (the Host header and TLS SNI still carry the name, so the
certificate is verified for it), never follows redirects and never goes
through an environment proxy: nothing re-resolves the name behind our back,
which is how a rebinding name slips past checks made by other clients.
``send``/``client`` serve httpx senders (webhooks); the web push sender pins
its aiohttp session through a resolver fed with ``check``'s targets instead
(services/webpush/client.py).
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import ipaddress
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

import httpx

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# Resolve (host, port) to addresses, in preference order.
Resolver = Callable[[str, int], Awaitable[list[str]]]

# Browser push services in use today (Chrome/Edge via FCM, Firefox, Safari, Windows).
KNOWN_PUSH_HOSTS: tuple[str, ...] = (
    "fcm.googleapis.com",
    "android.googleapis.com",
    ".push.services.mozilla.com",
    ".push.apple.com",
    ".notify.windows.com",
)

# Whitespace (\s is str.isspace for str patterns), control characters, backslashes: one C scan per URL.
_UNSAFE_CHAR = re.compile(r"[\s\x00-\x1f\\]")
# Retry-After delta-seconds: ASCII digits only (str.isdigit also takes "²" and other scripts' digits).
_DELTA_SECONDS = re.compile(r"[0-9]+")
# Only letters, digits, dots and dashes: a hostname or a dotted-quad address.
_HOSTNAME = re.compile(r"^[a-z0-9.-]+$")
# Spellings inet_aton accepts but that are not plain dotted quads (2130706433, 0x7f.1, 0177.0.0.1).
_NUMERIC_LOOKING = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+))*\.?$")


class Refused(Exception):
    """The URL or the address it resolves to may not be called; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Policy:
    """What may be called.

    ``allowed_hosts`` empty means any public host (webhooks); entries are exact
    names or ``.suffix`` for a domain's subdomains. ``allowed_networks`` lets an
    operator (or a test) reach a private or loopback network on purpose.
    """

    allowed_hosts: tuple[str, ...] = ()
    allowed_ports: tuple[int, ...] = (443,)
    allowed_networks: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True)
class Target:
    """A checked URL pinned to the one address it resolved to."""

    url: str
    host: str
    port: int
    path: str  # path and query, never empty
    address: str

    @property
    def pinned_url(self) -> str:
        """The URL with the name replaced by the resolved address."""
        literal = f"[{self.address}]" if ":" in self.address else self.address
        return f"https://{literal}:{self.port}{self.path}"

    @property
    def checked_url(self) -> str:
        """The URL rebuilt from the parts the guard checked (name, port, path): nothing left to misparse."""
        literal = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{literal}:{self.port}{self.path}"

    @property
    def host_header(self) -> str:
        """What the server expects in Host (the port only when it is not the default)."""
        return self.host if self.port == 443 else f"{self.host}:{self.port}"


async def system_resolver(host: str, port: int) -> list[str]:
    """The operating system's resolver, deduplicated, in its order."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: dict[str, None] = {}
    for info in infos:
        seen[str(info[4][0])] = None
    return list(seen)


def parse_networks(raw: str) -> tuple[IPNetwork, ...]:
    """``127.0.0.1/32,::1/128`` → networks (raises ValueError on a bad entry)."""
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in raw.split(",") if part.strip())


def _host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    if not allowed:
        return True
    for entry in allowed:
        if entry.startswith("."):
            if host.endswith(entry) and len(host) > len(entry):
                return True
        elif host == entry:
            return True
    return False


class Guard:
    """Checks URLs against a policy and sends requests pinned to the checked address."""

    def __init__(self, policy: Policy, resolver: Resolver | None = None) -> None:
        self.policy = policy
        self._resolve = resolver or system_resolver
        # The verdict on an address depends only on the policy: computed once per address
        # (is_global walks a dozen networks), bounded for a long-lived sender.
        self._address_ok = lru_cache(maxsize=4096)(self._address_allowed)

    def parse(self, url: str) -> tuple[str, int, str]:
        """Syntactic checks only (no DNS): → (host, port, path). Raises Refused."""
        if _UNSAFE_CHAR.search(url):
            raise Refused("the URL contains whitespace, control characters or backslashes")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise Refused(f"the URL cannot be parsed: {exc}") from exc
        if parts.scheme.lower() != "https":
            raise Refused("only https URLs are allowed")
        if "@" in parts.netloc or parts.username is not None or parts.password is not None:
            raise Refused("URLs with a user name or password are not allowed")
        host = (parts.hostname or "").rstrip(".")
        if not host:
            raise Refused("the URL has no host")
        port = 443 if port is None else port
        if port not in self.policy.allowed_ports:
            allowed = ", ".join(str(p) for p in self.policy.allowed_ports)
            raise Refused(f"port {port} is not allowed (allowed: {allowed})")
        literal = _ip_literal(host)
        if literal is None:
            if not _HOSTNAME.fullmatch(host):
                raise Refused("the host name has characters outside letters, digits, dots and dashes")
            if _NUMERIC_LOOKING.fullmatch(host):
                raise Refused("numeric host spellings other than a plain dotted address are not allowed")
        if not _host_allowed(host, self.policy.allowed_hosts):
            raise Refused(f"{host} is not a known push service")
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return host, port, path

    def _address_allowed(self, address: IPAddress) -> bool:
        if any(address in net for net in self.policy.allowed_networks):
            return True
        if isinstance(address, ipaddress.IPv6Address):
            form, carried = embedded_ipv4(address)
            if form == "translated":
                # Another spelling of one IPv4 address: judged as that address, and only so.
                return self._address_allowed(carried[0])
            if form == "tunnel" and not all(self._address_allowed(v4) for v4 in carried):
                return False
            if form == "local-nat64":
                return False  # the operator's own NAT64: where the IPv4 sits depends on its prefix length
        return address.is_global and not address.is_multicast

    async def check(self, url: str) -> Target:
        """Parse, resolve once and check every address; → a Target pinned to the first. Raises Refused."""
        host, port, path = self.parse(url)
        literal = _ip_literal(host)
        if literal is not None:
            addresses = [str(literal)]
        else:
            try:
                addresses = await self._resolve(host, port)
            except OSError as exc:
                raise Refused(f"{host} does not resolve: {exc}") from exc
        if not addresses:
            raise Refused(f"{host} does not resolve")
        for raw in addresses:
            address = _ip_literal(raw.split("%", 1)[0])
            if address is None:
                raise Refused(f"{host} resolved to {raw!r}, which is not an IP address")
            # Every answer must pass: a name that mixes public and private answers is a rebinding tool.
            if not self._address_ok(address):
                raise Refused(f"{host} resolves to {address}, {_describe(address)}")
        return Target(url=url, host=host, port=port, path=path, address=addresses[0])

    async def send(
        self,
        client: httpx.AsyncClient,
        target: Target,
        *,
        content: bytes,
        headers: Mapping[str, str],
        method: str = "POST",
    ) -> httpx.Response:
        """Send to the pinned address; redirects come back as responses, never followed."""
        request = client.build_request(
            method,
            target.pinned_url,
            content=content,
            headers={**headers, "host": target.host_header},
            extensions={"sni_hostname": target.host},
        )
        return await client.send(request, follow_redirects=False)


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")  # IPv4-mapped addresses
_SIIT = ipaddress.IPv6Network("::ffff:0:0:0/96")  # RFC 7915 IPv4-translated addresses
_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated IPv4-compatible addresses (RFC 4291 2.5.5.1)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052 well-known prefix
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215 local-use translation prefix


def embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[str, tuple[ipaddress.IPv4Address, ...]]:
    """The IPv4 address(es) an IPv6 address carries, and how: ``(form, addresses)``.

    ``translated``: the IPv6 address is only another spelling of one IPv4
    address (mapped ``::ffff:a.b.c.d``, SIIT ``::ffff:0:a.b.c.d``, compatible
    ``::a.b.c.d``, NAT64 ``64:ff9b::a.b.c.d``): a packet to it reaches that
    IPv4 host. ``tunnel``: 6to4 (``2002:AABB:CCDD::/48``) and Teredo (server
    and client) reach the IPv4 hosts they name through a relay.
    ``local-nat64``: the local-use prefix ``64:ff9b:1::/48``, whose IPv4 sits
    where the operator's prefix length puts it (refused). ``("", ())``: none.
    """
    # :: and ::1 are themselves (unspecified, loopback), not IPv4-compatible addresses.
    if int(address) > 1 and (address in _MAPPED or address in _SIIT or address in _NAT64 or address in _COMPATIBLE):
        return "translated", (ipaddress.IPv4Address(int(address) & 0xFFFFFFFF),)
    if address in _LOCAL_NAT64:
        return "local-nat64", ()
    if address.sixtofour is not None:  # 2002::/16, RFC 3056
        return "tunnel", (address.sixtofour,)
    if address.teredo is not None:  # 2001::/32, RFC 4380
        return "tunnel", address.teredo
    return "", ()


@lru_cache(maxsize=4096)  # called twice per check; a failed parse of a name costs two exceptions
def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _describe(address: IPAddress) -> str:
    """Why an address was refused, naming the IPv4 address an IPv6 form carries."""
    form, carried = embedded_ipv4(address) if isinstance(address, ipaddress.IPv6Address) else ("", ())
    if form == "local-nat64":
        return "a local-use NAT64 address (64:ff9b:1::/48), which is refused"
    if carried:
        named = " and ".join(str(v4) for v4 in carried)
        return f"which carries the IPv4 address {named}: a private, loopback or link-local address"
    return "a private, loopback or link-local address"


def client(
    *, ca_file: Path | None = None, http2: bool = True, timeout: float = 10.0, max_connections: int = 200
) -> httpx.AsyncClient:
    """The outbound HTTP client for pinned sends: no proxies from the environment, no redirects.

    ``ca_file`` adds a private CA (tests, or a self-hosted push relay);
    otherwise the system's trust store is used.
    """
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    return httpx.AsyncClient(
        http2=http2,
        verify=context,
        trust_env=False,
        follow_redirects=False,
        timeout=timeout,
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
    )


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """Retry-After (RFC 9110 §10.2.3) as seconds from ``now``; None when absent or not valid.

    Only ASCII digits (delta-seconds) or an HTTP date are accepted; anything
    else (signs, exponents, other scripts' digits) is ignored. The value is not
    capped here: the queue clamps every delay to its configured maximum when
    it records the outcome (``Queue.retry_delay``), so no peer can push a
    delivery out of range.
    """
    if not value:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        # Any number of digits is valid; past 20 of them the exact value no longer matters.
        return float(value) if len(value) <= 20 else 1e20
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" or a date without a zone: RFC 9110 dates are UTC
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - now)
