"""The outbound-request guard: every trick from the issue, and pinning against a rebinding name."""

from __future__ import annotations

import asyncpg
import pytest
from belfry import ssrf
from belfry.queue import Fail, Sent
from cryptography.hazmat.primitives.asymmetric import ec

from services.webpush import store
from services.webpush.sender import WebPushSender
from services.webpush.vapid import Vapid
from tests.push.conftest import message, push_port
from tests.push.fakes.push_service import PushService, b64url
from tests.push.fakes.tls import REBIND_NAME, Pki
from tests.push.push_helpers import lease_for

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


async def test_allowed_urls_are_pinned_to_the_one_resolution() -> None:
    resolve, asked = fixed([PUBLIC], ["127.0.0.1"])
    target = await ssrf.Guard(PUSH_ONLY, resolve).check("https://updates.push.services.mozilla.com/wpush/v2/abc?x=1")
    assert asked == ["updates.push.services.mozilla.com"]
    assert target.pinned_url == f"https://{PUBLIC}:443/wpush/v2/abc?x=1"
    assert target.host_header == "updates.push.services.mozilla.com"


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
    client = ssrf.Clients(2, ca_file=pki.ca_file)
    sender = WebPushSender(
        pool=pool,
        clients=client,
        guard=guard,
        vapid=Vapid(ec.generate_private_key(ec.SECP256R1()), "mailto:ops@example.com"),
        default_ttl=60,
    )
    before = push_service.requests
    outcome = await sender.handle(lease_for(message(account_id, "u1"), "browser"))
    await client.aclose()
    assert isinstance(outcome, Fail)
    assert "169.254.169.254" in outcome.error
    assert push_service.requests == before  # nothing left the process
    assert asked == [REBIND_NAME, REBIND_NAME]


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
    client = ssrf.Clients(2, ca_file=pki.ca_file)
    sender = WebPushSender(
        pool=pool,
        clients=client,
        guard=ssrf.Guard(policy, resolve),
        vapid=Vapid(ec.generate_private_key(ec.SECP256R1()), "mailto:ops@example.com"),
        default_ttl=60,
    )
    outcome = await sender.handle(lease_for(message(account_id, "u1"), "browser"))
    await client.aclose()
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
    client = ssrf.Clients(2, ca_file=pki.ca_file)
    sender = WebPushSender(
        pool=pool,
        clients=client,
        guard=ssrf.Guard(policy),
        vapid=Vapid(ec.generate_private_key(ec.SECP256R1()), "mailto:ops@example.com"),
        default_ttl=60,
    )
    before = push_service.requests
    outcome = await sender.handle(lease_for(message(account_id, "u1"), "browser"))
    await client.aclose()
    assert isinstance(outcome, Fail)
    assert "redirect" in outcome.error
    assert push_service.requests == before + 1
