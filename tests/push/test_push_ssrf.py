"""The outbound-request guard: every trick from the issue, and pinning against a rebinding name."""

from __future__ import annotations

import asyncio

import aiohttp
import asyncpg
import pytest
from belfry import ssrf
from belfry.queue import Fail, Sent

from services.webpush import client, store
from tests.push.conftest import message, push_port
from tests.push.fakes.push_service import PushService, b64url
from tests.push.fakes.tls import REBIND_NAME, Pki
from tests.push.push_helpers import lease_for
from tests.push.webpush_sender import open_sender

PUBLIC = "93.184.216.34"


def fixed(*answers: list[str]) -> tuple[ssrf.Resolver, list[str]]:
    """A resolver giving ``answers`` in turn (the last one repeats); also returns the names asked."""
    asked: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        asked.append(host)
        return answers[min(len(asked), len(answers)) - 1]

    return resolve, asked


ANY_PUBLIC = ssrf.Policy()  # webhooks: any public https host on 443
PUSH_ONLY = ssrf.Policy(allowed_hosts=ssrf.KNOWN_PUSH_HOSTS)


@pytest.mark.parametrize(
    ("url", "policy", "fragment"),
    [
        ("https://127.0.0.1/x", ANY_PUBLIC, "loopback"),
        ("https://169.254.169.254/latest/meta-data/", ANY_PUBLIC, "link-local"),
        ("https://[::1]/x", ANY_PUBLIC, "loopback"),
        ("https://[::ffff:127.0.0.1]/x", ANY_PUBLIC, "loopback"),
        ("https://[fe80::1]/x", ANY_PUBLIC, "link-local"),
        ("https://10.1.2.3/x", ANY_PUBLIC, "private"),
        ("https://2130706433/x", ANY_PUBLIC, "numeric"),
        ("https://0x7f000001/x", ANY_PUBLIC, "numeric"),
        ("https://0x7f.0.0.1/x", ANY_PUBLIC, "numeric"),
        ("https://0177.0.0.1/x", ANY_PUBLIC, "numeric"),
        ("https://fcm.googleapis.com@127.0.0.1/x", PUSH_ONLY, "user name"),
        ("https://user:pw@fcm.googleapis.com/x", PUSH_ONLY, "user name"),
        ("https://fcm.googleapis.com\\@127.0.0.1/x", PUSH_ONLY, "backslash"),
        ("http://fcm.googleapis.com/x", PUSH_ONLY, "https"),
        ("https://fcm.googleapis.com:8443/x", PUSH_ONLY, "port 8443"),
        ("https://fcm.googleapis.com.evil.com/x", PUSH_ONLY, "not a known push service"),
        ("https://evilpush.services.mozilla.com.attacker.net/x", PUSH_ONLY, "not a known push service"),
        ("https://xn--e1a.example/x\n", ANY_PUBLIC, "whitespace"),
        ("https:///x", ANY_PUBLIC, "no host"),
    ],
)
async def test_refused_urls(url: str, policy: ssrf.Policy, fragment: str) -> None:
    resolve, _ = fixed([PUBLIC])
    with pytest.raises(ssrf.Refused) as err:
        await ssrf.Guard(policy, resolve).check(url)
    assert fragment in err.value.reason


@pytest.mark.parametrize(
    "answers", [["127.0.0.1"], ["169.254.169.254"], ["::1"], [PUBLIC, "10.0.0.7"], ["::ffff:169.254.169.254"]]
)
async def test_names_resolving_to_internal_addresses_are_refused(answers: list[str]) -> None:
    resolve, _ = fixed(answers)
    with pytest.raises(ssrf.Refused) as err:
        await ssrf.Guard(ANY_PUBLIC, resolve).check("https://hooks.example.com/in")
    assert "resolves to" in err.value.reason


# IPv6 forms that carry an IPv4 address: judged by the IPv4 address they carry (issue 17, section 5).
CARRYING_INTERNAL = [
    "::127.0.0.1",  # IPv4-compatible
    "::169.254.169.254",
    "::ffff:0:127.0.0.1",  # SIIT (IPv4-translated)
    "::ffff:0:10.0.0.7",
    "64:ff9b::127.0.0.1",  # NAT64 well-known prefix
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
    "2001:0:808:808:0:0:80ff:fffe",  # Teredo: server 8.8.8.8, client 127.0.0.1
    "2001:0:a00:7:0:0:f7f7:f7f7",  # Teredo: server 10.0.0.7
]


@pytest.mark.parametrize("address", [*CARRYING_INTERNAL, "64:ff9b:1::7f00:1", "64:ff9b:1::5db8:d822"])
async def test_ipv6_forms_carrying_an_internal_ipv4_address_are_refused(address: str) -> None:
    # As a literal in the URL and as a DNS answer alike.
    resolve, _ = fixed([address])
    guard = ssrf.Guard(ANY_PUBLIC, resolve)
    for url in (f"https://[{address}]/in", "https://hooks.example.com/in"):
        with pytest.raises(ssrf.Refused) as err:
            await guard.check(url)
        assert "resolves to" in err.value.reason


@pytest.mark.parametrize(
    ("address", "carried"),
    [
        ("::ffff:0:127.0.0.1", "127.0.0.1"),
        ("64:ff9b::a9fe:a9fe", "169.254.169.254"),
        ("2002:a00:7::1", "10.0.0.7"),
        ("2001:0:808:808:0:0:80ff:fffe", "8.8.8.8 and 127.0.0.1"),
    ],
)
async def test_the_refusal_names_the_carried_ipv4_address(address: str, carried: str) -> None:
    resolve, _ = fixed([address])
    with pytest.raises(ssrf.Refused) as err:
        await ssrf.Guard(ANY_PUBLIC, resolve).check("https://hooks.example.com/in")
    assert f"carries the IPv4 address {carried}" in err.value.reason


@pytest.mark.parametrize("address", ["64:ff9b::5db8:d822", "::ffff:0:93.184.216.34", "2002:5db8:d822::1"])
async def test_ipv6_forms_carrying_a_public_ipv4_address_pass(address: str) -> None:
    # A DNS64 answer for a public host (an IPv6-only cluster behind NAT64) still works.
    resolve, _ = fixed([address])
    target = await ssrf.Guard(ANY_PUBLIC, resolve).check("https://hooks.example.com/in")
    assert target.address == address


async def test_an_allowed_ipv4_network_also_admits_its_translated_spellings() -> None:
    policy = ssrf.Policy(allowed_networks=ssrf.parse_networks("127.0.0.0/8"))
    for address in ("::ffff:127.0.0.1", "64:ff9b::127.0.0.1"):
        resolve, _ = fixed([address])
        assert (await ssrf.Guard(policy, resolve).check("https://localhost/x")).address == address


async def test_allowed_urls_are_pinned_to_the_one_resolution() -> None:
    resolve, asked = fixed([PUBLIC], ["127.0.0.1"])
    target = await ssrf.Guard(PUSH_ONLY, resolve).check("https://updates.push.services.mozilla.com/wpush/v2/abc?x=1")
    assert asked == ["updates.push.services.mozilla.com"]
    assert target.pinned_url == f"https://{PUBLIC}:443/wpush/v2/abc?x=1"
    assert target.host_header == "updates.push.services.mozilla.com"
    assert target.checked_url == "https://updates.push.services.mozilla.com:443/wpush/v2/abc?x=1"


async def test_the_request_url_is_rebuilt_from_the_checked_parts() -> None:
    resolve, _ = fixed([PUBLIC])
    target = await ssrf.Guard(ANY_PUBLIC, resolve).check("https://[2606:4700::1111]/in#frag")
    assert target.checked_url == "https://[2606:4700::1111]:443/in"
    assert target.address == "2606:4700::1111"


async def test_an_explicitly_allowed_network_is_reachable() -> None:
    resolve, _ = fixed(["127.0.0.1"])
    policy = ssrf.Policy(allowed_networks=ssrf.parse_networks("127.0.0.0/8"))
    target = await ssrf.Guard(policy, resolve).check("https://localhost/x")
    assert target.address == "127.0.0.1"


async def test_a_name_that_resolves_differently_the_second_time(
    pool: asyncpg.Pool,
    pki: Pki,
    push_service: PushService,
    account_id: str,
) -> None:
    """First answer: the (allowed) push service; second: the metadata address. The send must not follow."""
    port = push_port(push_service)
    policy = ssrf.Policy(
        allowed_hosts=(REBIND_NAME,), allowed_ports=(port,), allowed_networks=ssrf.parse_networks("127.0.0.0/8")
    )
    sub = push_service.subscribe(host=REBIND_NAME)
    resolve, asked = fixed(["127.0.0.1"], ["169.254.169.254"])
    guard = ssrf.Guard(policy, resolve)
    await guard.check(sub.endpoint)  # registration-time check: passes
    await store.upsert(pool, account_id, "u1", sub.endpoint, sub.p256dh, b64url(sub.auth), "rebind")
    before = push_service.requests
    async with open_sender(pool, pki, guard) as (sender, resolver):
        outcome = await sender.handle(lease_for(message(account_id, "u1"), "browser"))
        assert resolver.pinned(REBIND_NAME) is None  # the refused answer never reached the session
    assert isinstance(outcome, Fail)
    assert "169.254.169.254" in outcome.error
    assert push_service.requests == before  # nothing left the process
    assert asked == [REBIND_NAME, REBIND_NAME]


async def test_rebinding_to_a_private_address_after_a_send_makes_no_connection_to_it(
    pool: asyncpg.Pool, pki: Pki, push_service: PushService, account_id: str
) -> None:
    """The name first reaches the push service on 127.0.0.1, then answers 127.0.0.2 (not allowed here).

    A listener on 127.0.0.2 at the same port counts connection attempts: the
    second send is refused at the check and nothing ever connects there, even
    though the session already holds a connection for that name.
    """
    port = push_port(push_service)
    policy = ssrf.Policy(
        allowed_hosts=(REBIND_NAME,), allowed_ports=(port,), allowed_networks=ssrf.parse_networks("127.0.0.1/32")
    )
    attempts: list[object] = []

    async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        attempts.append(writer.get_extra_info("peername"))
        writer.close()

    trap = await asyncio.start_server(count, "127.0.0.2", port)
    sub = push_service.subscribe(host=REBIND_NAME)
    await store.upsert(pool, account_id, "u1", sub.endpoint, sub.p256dh, b64url(sub.auth), "rebind-2")
    resolve, asked = fixed(["127.0.0.1"], ["127.0.0.2"])
    try:
        async with open_sender(pool, pki, ssrf.Guard(policy, resolve)) as (sender, resolver):
            first = await sender.handle(lease_for(message(account_id, "u1"), "browser"))
            second = await sender.handle(lease_for(message(account_id, "u1"), "browser"))
            assert resolver.pinned(REBIND_NAME) == "127.0.0.1"  # only ever an approved address
    finally:
        trap.close()
        await trap.wait_closed()
    assert isinstance(first, Sent)
    assert isinstance(second, Fail)
    assert "127.0.0.2" in second.error
    assert asked == [REBIND_NAME, REBIND_NAME]
    assert attempts == []
    assert len([r for r in push_service.received if r.sub_id == sub.sub_id]) == 1


async def test_the_session_never_resolves_a_name_the_guard_did_not_approve(pki: Pki) -> None:
    """A request the guard never saw finds no address: the resolver refuses instead of asking DNS."""
    resolver = client.PinnedResolver()
    session = client.session(resolver, ca_file=pki.ca_file, timeout=5.0)
    try:
        with pytest.raises(aiohttp.ClientConnectorError) as err:
            await session.post("https://localhost/x", data=b"", allow_redirects=False)
    finally:
        await session.close()
    assert isinstance(err.value.os_error, client.NotPinned)


async def test_the_send_connects_to_the_checked_address_without_resolving_again(
    pool: asyncpg.Pool, pki: Pki, push_service: PushService, account_id: str
) -> None:
    """REBIND_NAME exists in no DNS: the push arrives only because the connection used the pinned address."""
    port = push_port(push_service)
    policy = ssrf.Policy(
        allowed_hosts=(REBIND_NAME,), allowed_ports=(port,), allowed_networks=ssrf.parse_networks("127.0.0.0/8")
    )
    sub = push_service.subscribe(host=REBIND_NAME)
    resolve, asked = fixed(["127.0.0.1"])
    await store.upsert(pool, account_id, "u1", sub.endpoint, sub.p256dh, b64url(sub.auth), "pinned")
    async with open_sender(pool, pki, ssrf.Guard(policy, resolve)) as (sender, _):
        outcome = await sender.handle(lease_for(message(account_id, "u1"), "browser"))
    assert isinstance(outcome, Sent)
    assert asked == [REBIND_NAME]  # resolved once, by the guard
    got = [r for r in push_service.received if r.sub_id == sub.sub_id]
    assert got[0].headers["host"] == f"{REBIND_NAME}:{port}"


async def test_a_redirect_to_an_internal_address_is_not_followed(
    pool: asyncpg.Pool, pki: Pki, push_service: PushService, account_id: str
) -> None:
    port = push_port(push_service)
    policy = ssrf.Policy(
        allowed_hosts=("localhost",), allowed_ports=(port,), allowed_networks=ssrf.parse_networks("127.0.0.0/8")
    )
    sub = push_service.subscribe()
    await store.upsert(pool, account_id, "u1", sub.endpoint, sub.p256dh, b64url(sub.auth), "redirect")
    push_service.script(sub.sub_id, (302, {"location": "https://169.254.169.254/latest/meta-data/"}))
    before = push_service.requests
    async with open_sender(pool, pki, ssrf.Guard(policy)) as (sender, _):
        outcome = await sender.handle(lease_for(message(account_id, "u1"), "browser"))
    assert isinstance(outcome, Fail)
    assert "redirect" in outcome.error
    assert push_service.requests == before + 1


async def test_the_push_service_certificate_is_verified(
    pool: asyncpg.Pool, pki: Pki, push_service: PushService, account_id: str
) -> None:
    """Without the test CA the loopback service's certificate is untrusted: no push, a retry naming it."""
    port = push_port(push_service)
    policy = ssrf.Policy(
        allowed_hosts=("localhost",), allowed_ports=(port,), allowed_networks=ssrf.parse_networks("127.0.0.0/8")
    )
    sub = push_service.subscribe()
    before = push_service.requests
    async with open_sender(pool, pki, ssrf.Guard(policy), trust_test_ca=False) as (sender, _):
        result = await sender.deliver(sub.endpoint, sub.p256dh, b64url(sub.auth), b'{"title":"x"}', {"ttl": "60"})
    assert result.kind == "retry"
    assert "certificate" in result.reason.lower()
    assert push_service.requests == before
