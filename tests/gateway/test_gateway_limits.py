"""A bounded gateway (issue 17, section 3): body size, request rates, socket caps, silent connections.

The oversized uploads run against a real gateway process, whose memory is
read from ``/proc``; the other limits against in-process replicas on port 0,
with real HTTP and websocket clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest
import websockets
from belfry.auth import TokenIssuer
from belfry.queue import presence

from services.gateway import settings
from services.preferences import catalogue
from tests.conftest import common_env
from tests.faults.processes import ServiceProcess
from tests.gateway.conftest import StartReplica, connect, frames_until

MIB = 1024 * 1024
LIMIT = 64 * 1024  # the body limit these tests configure


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _reset_peak(pid: int) -> None:
    """From now on VmHWM is the peak since this call (Linux: writing 5 to clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@pytest.fixture
async def gateway_process(database_url: str, token_keys: dict[str, bytes]) -> AsyncIterator[tuple[ServiceProcess, str]]:
    """A gateway as its own process (``python -m services.gateway``) and its HTTP base URL."""
    port = _free_port()
    env = {
        **os.environ,
        **common_env(database_url, token_keys),
        "BELFRY_LOG_LEVEL": "warning",
        "BELFRY_GATEWAY_HTTP_HOST": "127.0.0.1",
        "BELFRY_GATEWAY_HTTP_PORT": str(port),
        "BELFRY_GATEWAY_MAX_BODY_BYTES": str(LIMIT),
    }
    process = await ServiceProcess.start("gateway", env)
    try:
        yield process, f"http://127.0.0.1:{port}"
    finally:
        await process.stop()


async def _status(sock: socket.socket) -> int:
    """The status of the answer on ``sock`` (read apart from the sending, so a reset send loses nothing)."""
    loop = asyncio.get_running_loop()
    data = b""
    while b"\r\n" not in data:
        more = await loop.sock_recv(sock, 4096)
        if not more:
            raise AssertionError(f"closed without an answer after {data!r}")
        data += more
    return int(data.split()[1])


async def _upload(base: str, path: str, token: str, size: int, *, chunked: bool, held: asyncio.Event) -> int:
    """POST ``size`` bytes of a JSON body 1 MiB at a time, pausing once (``held``) after the first 32 KiB.

    Keeps sending until the server answers or drops the connection, as an
    attacker would; returns the HTTP status the server answered with.
    """
    loop = asyncio.get_running_loop()
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.setblocking(False)
    framing = "transfer-encoding: chunked" if chunked else f"content-length: {size}"
    head = b'{"what": "read", "ids": [' + b"1," * (16 * 1024)
    chunk = b"1," * (MIB // 2)

    def frame(data: bytes) -> bytes:
        return f"{len(data):x}\r\n".encode() + data + b"\r\n" if chunked else data

    await loop.sock_sendall(
        sock,
        f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\nauthorization: Bearer {token}\r\n"
        f"content-type: application/json\r\n{framing}\r\n\r\n".encode(),
    )
    answer = asyncio.ensure_future(_status(sock))
    try:
        with contextlib.suppress(ConnectionError):  # refused from its Content-Length: closed already
            await loop.sock_sendall(sock, frame(head))
        await held.wait()  # the upload is in flight: other requests run now
        sent = len(head)
        while sent < size and not answer.done():
            try:
                await loop.sock_sendall(sock, frame(chunk))
            except ConnectionError:
                break
            sent += len(chunk)
        return await answer
    finally:
        answer.cancel()
        sock.close()


async def test_oversized_bodies_are_refused_without_growing_the_gateway(
    gateway_process: tuple[ServiceProcess, str], issuer: TokenIssuer, account_id: str
) -> None:
    process, base = gateway_process
    attacker = issuer.issue(account_id, "mallory")
    tenant = {"authorization": f"Bearer {issuer.issue(account_id + '_other', 'ana')}"}
    async with httpx.AsyncClient(base_url=base, headers=tenant) as http:
        assert (await http.get("/api/feed")).status_code == 200  # warm: the first request's imports and pool
        before = _kib(process.pid, "VmRSS")
        _reset_peak(process.pid)
        held = asyncio.Event()
        uploads = [
            asyncio.ensure_future(_upload(base, "/api/feed/mark", attacker, 200 * MIB, chunked=False, held=held)),
            asyncio.ensure_future(_upload(base, "/api/feed/mark", attacker, 200 * MIB, chunked=True, held=held)),
            asyncio.ensure_future(
                _upload(base, "/api/preferences/SetAccountDefaults", attacker, 100 * MIB, chunked=True, held=held)
            ),
        ]
        # Both uploads are open and part-sent: another tenant's requests complete meanwhile.
        answers = [await http.get("/api/feed") for _ in range(5)]
        assert [a.status_code for a in answers] == [200] * 5
        assert not any(u.done() for u in uploads)
        held.set()
        assert await asyncio.gather(*uploads) == [413, 413, 413]
        assert (await http.get("/api/unread")).status_code == 200
    process.assert_alive()
    growth_mib = (_kib(process.pid, "VmHWM") - before) / 1024
    assert growth_mib < 20, f"the gateway grew by {growth_mib:.1f} MiB"


async def test_a_declared_length_over_the_limit_is_refused_before_the_body(
    start_replica: StartReplica, issuer: TokenIssuer, account_id: str
) -> None:
    replica = await start_replica(BELFRY_GATEWAY_MAX_BODY_BYTES=str(LIMIT))
    host, port = replica.http.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    token = issuer.issue(account_id, "u1")
    writer.write(
        f"POST /api/feed/mark HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n"
        f"content-length: {10 * 1024**3}\r\n\r\n".encode()
    )
    await writer.drain()
    # Not one byte of the body was sent: the answer comes from the header alone, and the connection ends.
    answer = await reader.read()
    writer.close()
    assert answer.split()[1] == b"413"
    assert f"larger than {LIMIT} bytes".encode() in answer


async def test_bodies_within_the_limit_still_work(
    start_replica: StartReplica, issuer: TokenIssuer, account_id: str
) -> None:
    replica = await start_replica(BELFRY_GATEWAY_MAX_BODY_BYTES=str(LIMIT))
    headers = {"authorization": f"Bearer {issuer.issue(account_id, 'u1')}"}
    async with httpx.AsyncClient(base_url=replica.http, headers=headers) as http:
        ok = await http.post("/api/feed/mark", json={"ids": list(range(1, 501)), "what": "read"})
        assert ok.status_code == 200, ok.text
    go = asyncio.Event()
    go.set()
    token = issuer.issue(account_id, "u1")
    assert await _upload(replica.http, "/api/feed/mark", token, LIMIT + 1, chunked=True, held=go) == 413


def test_the_default_limits_hold_the_admin_pages_largest_request() -> None:
    # SetAccountDefaults sends every topic on every channel: it must fit the default body limit.
    topics = catalogue.load().topics
    body = {
        "choices": [
            {"topic": key, "channel": f"CHANNEL_{channel.upper()}", "enabled": True}
            for key in topics
            for channel in ("email", "bell", "popup", "browser", "other_apps", "mobile")
        ]
    }
    defaults = settings.load_settings(common_env("postgresql://unused", {"k1": b"x" * 32}))
    assert len(json.dumps(body)) * 2 < defaults.bounds.max_body_bytes  # room to grow
    assert defaults.auth_timeout == 2.0  # an unauthenticated socket is closed within 2 s by default


async def test_a_user_over_the_request_rate_gets_429_with_retry_after(
    start_replica: StartReplica, issuer: TokenIssuer, account_id: str
) -> None:
    replica = await start_replica(BELFRY_GATEWAY_USER_RATE="0.001", BELFRY_GATEWAY_USER_BURST="3")
    async with httpx.AsyncClient(base_url=replica.http) as http:
        mine = {"authorization": f"Bearer {issuer.issue(account_id, 'u1')}"}
        answers = [await http.get("/api/unread", headers=mine) for _ in range(4)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429]
        assert int(answers[-1].headers["retry-after"]) >= 1
        # Proxied routes count too; another user of the same account has a budget of their own.
        assert (await http.post("/api/preferences/GetPreferences", json={}, headers=mine)).status_code == 429
        theirs = {"authorization": f"Bearer {issuer.issue(account_id, 'u2')}"}
        assert (await http.get("/api/unread", headers=theirs)).status_code == 200


async def test_a_client_address_over_the_request_rate_gets_429(
    start_replica: StartReplica, issuer: TokenIssuer, account_id: str
) -> None:
    replica = await start_replica(
        BELFRY_GATEWAY_CLIENT_RATE="0.001",
        BELFRY_GATEWAY_CLIENT_BURST="2",
        BELFRY_GATEWAY_TRUSTED_PROXIES="127.0.0.1/32",  # the test stands in for a proxy naming its clients
    )
    async with httpx.AsyncClient(base_url=replica.http) as http:

        async def get(address: str, user: str) -> httpx.Response:
            headers = {"authorization": f"Bearer {issuer.issue(account_id, user)}", "x-forwarded-for": address}
            return await http.get("/api/unread", headers=headers)

        # Whatever user it claims: the address's budget is spent (with no token at all, too).
        statuses = [(await get("203.0.113.7", f"u{i}")).status_code for i in range(3)]
        assert statuses == [200, 200, 429]
        anonymous = await http.get("/api/unread", headers={"x-forwarded-for": "203.0.113.7"})
        assert anonymous.status_code == 429 and int(anonymous.headers["retry-after"]) >= 1
        assert (await get("203.0.113.8", "u1")).status_code == 200
        # IPv6 clients are counted per /64.
        assert [(await get(f"2001:db8:1:2::{i}", "u1")).status_code for i in (1, 2, 3)] == [200, 200, 429]


async def test_forwarded_for_is_ignored_unless_the_peer_is_a_trusted_proxy(
    start_replica: StartReplica, issuer: TokenIssuer, account_id: str
) -> None:
    replica = await start_replica(BELFRY_GATEWAY_CLIENT_RATE="0.001", BELFRY_GATEWAY_CLIENT_BURST="2")
    headers = {"authorization": f"Bearer {issuer.issue(account_id, 'u1')}"}
    async with httpx.AsyncClient(base_url=replica.http, headers=headers) as http:
        # A client inventing a new address per request is still one client.
        statuses = [
            (await http.get("/api/unread", headers={"x-forwarded-for": f"198.51.100.{i}"})).status_code
            for i in range(3)
        ]
        assert statuses == [200, 200, 429]


async def _refused_status(url: str, **kwargs: object) -> int:
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(url, **kwargs)  # type: ignore[arg-type]
    return int(refused.value.response.status_code)


async def test_websockets_are_capped_per_user(
    start_replica: StartReplica, issuer: TokenIssuer, account_id: str
) -> None:
    replica = await start_replica(BELFRY_GATEWAY_MAX_SOCKETS_PER_USER="2")
    token = issuer.issue(account_id, "u1")
    tabs = [await connect(replica.ws, token) for _ in range(2)]
    for tab in tabs:
        await frames_until(tab, "ready")
    third = await connect(replica.ws, token)
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await third.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4429
    other = await connect(replica.ws, issuer.issue(account_id, "u2"))
    await frames_until(other, "ready")
    await tabs[0].close()
    hub = replica.build.hub
    assert hub is not None
    while len(hub.tabs.get((account_id, "u1"), ())) > 1:  # noqa: ASYNC110 - the hub has no event for a tab leaving
        await asyncio.sleep(0.01)
    again = await connect(replica.ws, token)
    await frames_until(again, "ready")  # a closed tab frees its place
    for ws in (tabs[1], other, again):
        await ws.close()


async def test_websockets_are_capped_per_client_address_and_per_replica(
    start_replica: StartReplica, issuer: TokenIssuer, account_id: str
) -> None:
    replica = await start_replica(
        BELFRY_GATEWAY_MAX_SOCKETS_PER_CLIENT="2",
        BELFRY_GATEWAY_MAX_SOCKETS="3",
        BELFRY_GATEWAY_TRUSTED_PROXIES="127.0.0.1",
    )
    first = {"additional_headers": {"x-forwarded-for": "203.0.113.7"}}
    second = {"additional_headers": {"x-forwarded-for": "203.0.113.8"}}
    # Counted before authentication: unauthenticated sockets hold their place too.
    held = [await websockets.connect(replica.ws, **first) for _ in range(2)]  # type: ignore[arg-type]
    assert await _refused_status(replica.ws, **first) == 429
    held.append(await websockets.connect(replica.ws, **second))  # type: ignore[arg-type]
    assert await _refused_status(replica.ws, additional_headers={"x-forwarded-for": "203.0.113.9"}) == 503
    for ws in held:
        await ws.close()


async def test_unauthenticated_sockets_are_closed_after_the_auth_timeout(start_replica: StartReplica) -> None:
    replica = await start_replica(BELFRY_GATEWAY_AUTH_TIMEOUT_SECONDS="0.3")
    idle = [await websockets.connect(replica.ws) for _ in range(30)]
    for ws in idle:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 60)  # a hang guard, not a measurement
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
    assert replica.build.hub is not None and replica.build.hub.connections == 0


async def test_a_connection_that_never_sends_a_request_is_closed(start_replica: StartReplica) -> None:
    replica = await start_replica(BELFRY_GATEWAY_AUTH_TIMEOUT_SECONDS="0.3")
    host, port = replica.http.removeprefix("http://").split(":")
    silent = [await asyncio.open_connection(host, int(port)) for _ in range(10)]
    slow_reader, slow_writer = await asyncio.open_connection(host, int(port))
    slow_writer.write(b"GET /api/unread HTTP/1.1\r\n")  # a head that never ends
    for reader, _ in [*silent, (slow_reader, slow_writer)]:
        assert await asyncio.wait_for(reader.read(), 60) == b""  # closed by the server (the wait is a hang guard)
    for _, writer in [*silent, (slow_reader, slow_writer)]:
        writer.close()


async def test_presence_is_untouched_by_refused_sockets(
    start_replica: StartReplica, issuer: TokenIssuer, account_id: str, pool: asyncpg.Pool
) -> None:
    replica = await start_replica(BELFRY_GATEWAY_MAX_SOCKETS_PER_USER="1")
    token = issuer.issue(account_id, "u1")
    tab = await connect(replica.ws, token)
    await frames_until(tab, "ready")
    refused = await connect(replica.ws, token)
    with pytest.raises(websockets.ConnectionClosed):
        await refused.recv()
    assert await presence.has_live_tab(pool, account_id, "u1")
    await tab.close()
